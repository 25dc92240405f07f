"""The codec benchmark end to end on a tiny tensor: every entry, the checks and the plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.codecs import HIVEMIND_CODECS, main, summarise
from locoswarm.compression import CODEC_NAMES


def test_quick_run_on_a_tiny_tensor_writes_every_entry(tmp_path: Path) -> None:
    out = tmp_path / "codecs.json"
    rc = main(["--quick", "--json", str(out), "--numel", "100000", "--repeats", "1"])
    assert rc == 0
    data = json.loads(out.read_text())

    header = data["header"]
    assert header["numel"] == 100_000
    assert header["repeats"] == 1
    for field in ("torch_threads", "cpu_count", "torch_version", "numpy_version"):
        assert header[field], field

    results = data["results"]
    assert results["memcpy"]["encode"]["gbps"] > 0
    for name in CODEC_NAMES:
        entry = results[f"locoswarm/{name}"]
        for phase in ("encode", "decode"):
            assert entry[phase]["error"] is None, (name, entry[phase]["error"])
            assert entry[phase]["gbps"] > 0, name
            assert len(entry[phase]["times_s"]) == 1, name
        assert entry["bits_per_param"] > 0, name
        assert 0 <= entry["rel_error"] < 1.5, name
    assert results["locoswarm/fp32"]["rel_error"] == 0.0

    for cls in HIVEMIND_CODECS:
        entry = results[f"hivemind/{cls}"]
        assert entry["encode"]["error"] is None, (cls, entry["encode"]["error"])
        assert entry["bits_per_param_serialized"] >= entry["bits_per_param_buffer"] > 0, cls
        decode = entry["decode"]
        # Either measured, or recorded as a failure with "<type>: <message>".
        if decode["error"] is None:
            assert decode["gbps"] > 0, cls
            assert entry["rel_error"] is not None, cls
        else:
            assert ": " in decode["error"], cls
            assert decode["gbps"] is None, cls
            assert entry["rel_error"] is None, cls

    checks = data["checks"]
    assert checks, "no checks"
    assert all(v is None or isinstance(v, bool) for v in checks.values()), checks
    for check, ok in checks.items():
        if ok is None:
            assert data["check_notes"][check], check
    assert any("Uniform8Bit" in c for c in checks)
    assert any(c.startswith("topk bits/param") for c in checks)

    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _entry(family: str, enc: float | None, dec: float | None, bits: float | None) -> dict[str, Any]:
    def phase(v: float | None) -> dict[str, Any]:
        return {"gbps": v, "error": None if v is not None else "TypeError: boom"}

    return {"family": family, "encode": phase(enc), "decode": phase(dec), "bits_per_param": bits}


def test_checks_record_none_with_a_reason_when_hivemind_fails() -> None:
    results = {
        "memcpy": _entry("limit", 10.0, 10.0, 32.0),
        "locoswarm/int8": _entry("locoswarm", 6.0, 8.0, 8.0078),
        "hivemind/Uniform8BitQuantization": _entry("hivemind", None, None, 8.02),
    }
    s = summarise(results)
    speed = [c for c in s["checks"] if "Uniform8Bit" in c]
    assert len(speed) == 2
    for check in speed:
        assert s["checks"][check] is None
        assert "TypeError: boom" in s["check_notes"][check]
    assert s["checks"]["int8 encode and decode >= 15% of memcpy GB/s"] is True
    assert s["checks"]["int8 bits/param <= 8.01"] is True
    # Codecs that were not measured at all give None with a reason, not a crash.
    assert s["checks"]["int4 bits/param <= 4.02"] is None
    assert "not measured" in s["check_notes"]["int4 bits/param <= 4.02"]


def test_speed_checks_compare_against_hivemind_encode() -> None:
    results = {
        "memcpy": _entry("limit", 10.0, 10.0, 32.0),
        "locoswarm/int8": _entry("locoswarm", 6.0, 4.0, 8.0078),
        "hivemind/Uniform8BitQuantization": _entry("hivemind", 1.0, None, 8.02),
    }
    s = summarise(results)
    assert s["checks"]["int8 encode >= 5x hivemind Uniform8Bit encode GB/s"] is True
    assert s["checks"]["int8 decode >= 5x hivemind Uniform8Bit encode GB/s"] is False
    assert s["figures"]["int8_encode_over_hivemind_uniform8_encode"] == 6.0
    assert s["figures"]["int8_decode_over_hivemind_uniform8_decode"] is None
