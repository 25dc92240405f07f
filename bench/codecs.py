"""Codec benchmark: locoswarm's codecs against hivemind's and a plain memory copy, on one tensor.

Usage: python bench/codecs.py [--quick] --json out/codecs.json [--png out/codecs.png]

One fp32 tensor drawn from N(0, 1) with a fixed seed (25M elements; ``--quick``: 2M) is encoded
and decoded by every locoswarm codec (``CODEC_NAMES``; top-k at ratio 0.01), by hivemind's
``Float16Compression``, ``ScaledFloat16Compression``, ``Uniform8BitQuantization`` and
``Quantile8BitQuantization``, and copied by ``torch.empty_like(x).copy_(x)`` as the limit.

For each it records encode and decode speed (GB/s, where GB is 1e9 bytes of fp32 input, i.e.
``4 * numel / seconds``; best of N timed repeats after one warm-up), bits per parameter including
metadata, the relative error ``||x - x_hat|| / ||x||`` and the wall time. A phase that raises (as
hivemind's 8-bit decoders do under numpy >= 2.4) is recorded as ``"error": "<type>: <message>"``
and the benchmark carries on. Writes JSON with a header, the per-codec results and the target
checks, and a PNG with speeds (left) and bits against error (right). Prints a table to stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import finite as _finite
from bench.common import print_checks

FULL_NUMEL = 25_000_000
QUICK_NUMEL = 2_000_000
FULL_REPEATS = 5
QUICK_REPEATS = 3
SEED = 0
BLOCK_SIZE = 4096
TOPK_RATIO = 0.01
HIVEMIND_CODECS = (
    "Float16Compression",
    "ScaledFloat16Compression",
    "Uniform8BitQuantization",
    "Quantile8BitQuantization",
)
# The elementwise locoswarm codecs whose speed is held against the memory copy.
ELEMENTWISE = ("fp32", "fp16", "bf16", "int8", "int4", "sign")
MEMCPY_FRACTION = 0.15
HIVEMIND_SPEEDUP = 5.0
BITS_LIMITS = {"int8": 8.01, "int4": 4.02, "sign": 1.01, "topk": 0.5}
HM_UNIFORM8 = "hivemind/Uniform8BitQuantization"


@dataclass
class Phase:
    """One timed phase (encode, decode or copy) of one codec.

    Attributes:
        times_s: Seconds of each timed repeat (the warm-up is not included).
        error: ``"<type>: <message>"`` if the phase raised, else None.
    """

    times_s: list[float]
    error: str | None = None

    def to_dict(self, numel: int) -> dict[str, Any]:
        """The phase as JSON: best time, GB/s of fp32 input, all times and any error."""
        best = min(self.times_s) if self.times_s else None
        return {
            "gbps": 4 * numel / best / 1e9 if best is not None and best > 0 else None,
            "best_s": best,
            "times_s": self.times_s,
            "error": self.error,
        }


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[Phase, Any]:
    """Run ``fn`` once to warm up, then ``repeats`` timed times; keep only the last result.

    Args:
        fn: The operation to time.
        repeats: Number of timed calls.

    Returns:
        The phase (times, or the error of the first call that raised) and the last result, or
        None if a call raised.
    """
    times: list[float] = []
    result: Any = None
    try:
        result = fn()
        for _ in range(repeats):
            result = None  # free the previous output before producing the next
            started = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - started)
    except Exception as exc:  # noqa: BLE001 - benchmark boundary: recorded in the JSON, never fatal
        return Phase(times, _describe(exc)), None
    return Phase(times), result


def _rel_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """``||x - x_hat|| / ||x||`` accumulated in float64."""
    diff = x - x_hat.reshape(x.shape).to(torch.float32)
    num = torch.linalg.vector_norm(diff, dtype=torch.float64).item()
    del diff
    den = torch.linalg.vector_norm(x, dtype=torch.float64).item()
    return float(num / den)


def bench_memcpy(x: torch.Tensor, repeats: int) -> dict[str, Any]:
    """Time ``torch.empty_like(x).copy_(x)``, the speed limit of any codec on this machine."""
    started = time.perf_counter()
    phase, out = _timed(lambda: torch.empty_like(x).copy_(x), repeats)
    d = phase.to_dict(x.numel())
    # For reading the figures only: the same copy without a fresh allocation (no page faults).
    buf = out if out is not None else torch.empty_like(x)
    prealloc, _ = _timed(lambda: buf.copy_(x), repeats)
    return {
        "family": "limit",
        "codec": "torch.empty_like(x).copy_(x)",
        "encode": d,
        "decode": d,
        "copy_into_preallocated": prealloc.to_dict(x.numel()),
        "bits_per_param": 32.0,
        "rel_error": 0.0,
        "wall_s": time.perf_counter() - started,
    }


def bench_locoswarm(name: str, x: torch.Tensor, repeats: int) -> dict[str, Any]:
    """Encode and decode ``x`` with one locoswarm codec.

    Args:
        name: A name from ``locoswarm.compression.CODEC_NAMES``.
        x: The fp32 input.
        repeats: Timed repeats per phase.

    Returns:
        The codec's JSON entry.
    """
    from locoswarm.compression import get_codec

    started = time.perf_counter()
    numel = x.numel()
    entry: dict[str, Any] = {"family": "locoswarm", "codec": name}
    try:
        codec = get_codec(name, block_size=BLOCK_SIZE, topk_ratio=TOPK_RATIO)
    except Exception as exc:  # noqa: BLE001 - benchmark boundary: recorded in the JSON
        err = _describe(exc)
        entry.update(encode=Phase([], err).to_dict(numel), decode=Phase([], err).to_dict(numel))
        entry.update(bits_per_param=None, rel_error=None, wall_s=time.perf_counter() - started)
        return entry
    enc_phase, enc = _timed(lambda: codec.encode(x, name="x"), repeats)
    entry["encode"] = enc_phase.to_dict(numel)
    entry["bits_per_param"] = None
    entry["rel_error"] = None
    if enc is None:
        entry["decode"] = Phase([], "skipped: encode failed").to_dict(numel)
    else:
        entry["payload_bytes"] = len(enc.payload)
        entry["bits_per_param"] = 8 * len(enc.payload) / numel
        dec_phase, out = _timed(lambda: codec.decode(enc), repeats)
        entry["decode"] = dec_phase.to_dict(numel)
        del enc
        if out is not None:
            entry["decoded_dtype"] = str(out.dtype).replace("torch.", "")
            entry["decoded_shape_ok"] = tuple(out.shape) == tuple(x.shape)
            entry["rel_error"] = _rel_error(x, out)
            del out
    entry["wall_s"] = time.perf_counter() - started
    return entry


def _reference_8bit_decode(buffer: bytes, shape: torch.Size) -> torch.Tensor:
    """Decode hivemind's 8-bit layout (int64 n, fp32 codebook[n], uint8 indices) without its bug.

    hivemind's own ``extract`` calls ``int()`` on a one-element array, which numpy >= 2.4 rejects.
    This is used only to put an error figure on the plot; it is not timed.
    """
    n = int(np.frombuffer(buffer, count=1, dtype=np.int64)[0])
    codebook = torch.from_numpy(np.frombuffer(buffer, offset=8, count=n, dtype=np.float32).copy())
    idx = torch.from_numpy(np.frombuffer(buffer, offset=8 + 4 * n, dtype=np.uint8).copy())
    return codebook[idx.long()].reshape(shape)


def bench_hivemind(cls_name: str, x: torch.Tensor, repeats: int) -> dict[str, Any]:
    """Compress and extract ``x`` with one of hivemind's codecs.

    Encode times ``compress`` (which returns a ``runtime_pb2.Tensor``); decode times ``extract``
    on that message. Protobuf serialization is not timed, but its size is reported.

    Args:
        cls_name: A class name in ``hivemind.compression``.
        x: The fp32 input.
        repeats: Timed repeats per phase.

    Returns:
        The codec's JSON entry.
    """
    import hivemind.compression as hc

    started = time.perf_counter()
    numel = x.numel()
    entry: dict[str, Any] = {"family": "hivemind", "codec": cls_name}
    codec = getattr(hc, cls_name)()
    info = hc.CompressionInfo.from_tensor(x)
    with warnings.catch_warnings():
        # torch deprecates quantize_per_tensor (used by Uniform8BitQuantization): keep stderr clean.
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor", category=UserWarning)
        enc_phase, msg = _timed(lambda: codec.compress(x, info, allow_inplace=False), repeats)
    entry["encode"] = enc_phase.to_dict(numel)
    entry["bits_per_param"] = None
    entry["rel_error"] = None
    if msg is None:
        entry["decode"] = Phase([], "skipped: encode failed").to_dict(numel)
    else:
        buffer_bytes = len(msg.buffer)
        serialized_bytes = len(msg.SerializeToString())
        entry["buffer_bytes"] = buffer_bytes
        entry["serialized_bytes"] = serialized_bytes
        entry["bits_per_param_buffer"] = 8 * buffer_bytes / numel
        entry["bits_per_param_serialized"] = 8 * serialized_bytes / numel
        entry["bits_per_param"] = entry["bits_per_param_serialized"]
        dec_phase, out = _timed(lambda: codec.extract(msg), repeats)
        entry["decode"] = dec_phase.to_dict(numel)
        if out is not None:
            entry["rel_error"] = _rel_error(x, out)
            del out
        elif cls_name in ("Uniform8BitQuantization", "Quantile8BitQuantization"):
            try:
                ref = _reference_8bit_decode(msg.buffer, x.shape)
                entry["rel_error_reference_decode"] = _rel_error(x, ref)
                del ref
            except Exception as exc:  # noqa: BLE001 - benchmark boundary: recorded in the JSON
                entry["rel_error_reference_decode_error"] = _describe(exc)
        del msg
    entry["wall_s"] = time.perf_counter() - started
    return entry


def _gbps(results: dict[str, dict[str, Any]], key: str, phase: str) -> float | None:
    entry = results.get(key)
    if entry is None:
        return None
    value = entry[phase]["gbps"]
    return float(value) if value is not None else None


def _why_missing(results: dict[str, dict[str, Any]], key: str, phase: str) -> str:
    entry = results.get(key)
    if entry is None:
        return f"{key} was not measured"
    return f"{key} {phase} failed: {entry[phase]['error']}"


def summarise(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The target checks and the figures behind them.

    A check is True or False, or None (with a line in ``check_notes``) when a measurement it
    needs failed.

    Args:
        results: Per-codec entries keyed ``"locoswarm/<name>"``, ``"hivemind/<class>"`` and
            ``"memcpy"``.

    Returns:
        ``{"checks": {...}, "figures": {...}, "check_notes": {...}}``.
    """
    checks: dict[str, bool | None] = {}
    figures: dict[str, float | None] = {}
    notes: dict[str, str] = {}

    hm_enc = _gbps(results, HM_UNIFORM8, "encode")
    hm_dec = _gbps(results, HM_UNIFORM8, "decode")
    for phase in ("encode", "decode"):
        ours = _gbps(results, "locoswarm/int8", phase)
        check = f"int8 {phase} >= {HIVEMIND_SPEEDUP:g}x hivemind Uniform8Bit encode GB/s"
        ratio_key = f"int8_{phase}_over_hivemind_uniform8_encode"
        if ours is None or hm_enc is None:
            checks[check] = None
            figures[ratio_key] = None
            notes[check] = (
                _why_missing(results, "locoswarm/int8", phase)
                if ours is None
                else _why_missing(results, HM_UNIFORM8, "encode")
            )
        else:
            figures[ratio_key] = ours / hm_enc
            checks[check] = ours >= HIVEMIND_SPEEDUP * hm_enc
    # Like for like, for information only (hivemind's decoder may fail).
    ours_dec = _gbps(results, "locoswarm/int8", "decode")
    if ours_dec is not None and hm_dec is not None:
        figures["int8_decode_over_hivemind_uniform8_decode"] = ours_dec / hm_dec
    else:
        figures["int8_decode_over_hivemind_uniform8_decode"] = None
        notes["int8_decode_over_hivemind_uniform8_decode"] = (
            _why_missing(results, HM_UNIFORM8, "decode")
            if hm_dec is None
            else _why_missing(results, "locoswarm/int8", "decode")
        )

    copy = _gbps(results, "memcpy", "encode")
    figures["memcpy_gbps"] = copy
    for name in ELEMENTWISE:
        key = f"locoswarm/{name}"
        check = f"{name} encode and decode >= {MEMCPY_FRACTION:.0%} of memcpy GB/s"
        enc, dec = _gbps(results, key, "encode"), _gbps(results, key, "decode")
        figures[f"{name}_encode_over_memcpy"] = enc / copy if enc and copy else None
        figures[f"{name}_decode_over_memcpy"] = dec / copy if dec and copy else None
        if enc is None or dec is None or copy is None:
            checks[check] = None
            notes[check] = "; ".join(
                _why_missing(results, k, p)
                for k, p, v in (
                    (key, "encode", enc),
                    (key, "decode", dec),
                    ("memcpy", "encode", copy),
                )
                if v is None
            )
        else:
            checks[check] = enc >= MEMCPY_FRACTION * copy and dec >= MEMCPY_FRACTION * copy

    for name, limit in BITS_LIMITS.items():
        key = f"locoswarm/{name}"
        check = f"{name} bits/param <= {limit}"
        bits = results.get(key, {}).get("bits_per_param")
        figures[f"{name}_bits_per_param"] = bits
        if bits is None:
            checks[check] = None
            notes[check] = _why_missing(results, key, "encode")
        else:
            checks[check] = bits <= limit
    return {"checks": checks, "figures": figures, "check_notes": notes}


def _short(key: str) -> str:
    family, _, name = key.partition("/")
    if family == "hivemind":
        return "hm:" + name.replace("Compression", "").replace("Quantization", "")
    return name or key


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Left: encode/decode GB/s per codec (log), memcpy as a line. Right: bits vs error.

    Args:
        results: Per-codec entries as in the JSON.
        path: Where to write the PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in results if k != "memcpy"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5.5))
    width = 0.4
    positives = [1e-3]
    for i, key in enumerate(keys):
        for j, (phase, color) in enumerate((("encode", "tab:blue"), ("decode", "tab:orange"))):
            value = results[key][phase]["gbps"]
            xpos = i + (j - 0.5) * width
            if value is None:
                left.text(xpos, 1e-2, "failed", rotation=90, ha="center", va="bottom", fontsize=7)
                continue
            positives.append(value)
            left.bar(xpos, value, width, color=color, label=phase if i == 0 else None)
    copy = results.get("memcpy", {}).get("encode", {}).get("gbps")
    if copy:
        left.axhline(copy, color="k", linestyle="--", label=f"memcpy {copy:.2f} GB/s")
        left.axhline(MEMCPY_FRACTION * copy, color="gray", linestyle=":", label="15% of memcpy")
    left.set_yscale("log")
    left.set_ylim(5e-3, 30 * max([*positives, copy or 0.0]))
    left.set_xticks(range(len(keys)), [_short(k) for k in keys], rotation=35, ha="right")
    left.set(ylabel="GB/s of fp32 input (best of N)", title="encode / decode speed")
    left.legend(fontsize=8, loc="upper right", ncol=2)
    left.grid(alpha=0.3, axis="y")

    floor = 1e-6
    placed: dict[tuple[float, float, bool], int] = {}
    for key in keys:
        entry = results[key]
        bits = entry.get("bits_per_param")
        err = entry.get("rel_error")
        label = _short(key)
        if err is None and entry.get("rel_error_reference_decode") is not None:
            err = entry["rel_error_reference_decode"]
            label += " (ref. decode)"
        if bits is None or err is None:
            continue
        if err <= floor:
            label += " (exact)"
        ours = entry["family"] == "locoswarm"
        right.scatter(
            bits,
            max(err, floor),
            marker="o" if ours else "^",
            color="tab:blue" if ours else "tab:red",
            s=50,
        )
        # Ours are labelled on the right, hivemind's on the left; coinciding points are stacked.
        spot = (round(math.log10(bits), 2), round(math.log10(max(err, floor)), 1), ours)
        stack = placed.get(spot, 0)
        placed[spot] = stack + 1
        right.annotate(
            label,
            (bits, max(err, floor)),
            textcoords="offset points",
            xytext=(6, 3 - 10 * stack) if ours else (-6, -3 - 10 * stack),
            ha="left" if ours else "right",
            fontsize=8,
        )
    right.scatter([], [], marker="o", color="tab:blue", label="locoswarm")
    right.scatter([], [], marker="^", color="tab:red", label="hivemind")
    right.set(
        xscale="log",
        yscale="log",
        xlabel="bits per parameter (incl. metadata)",
        ylabel="relative error ||x - x_hat|| / ||x||",
        title="size vs error (N(0,1) input)",
    )
    right.legend(fontsize=8)
    right.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: float | None, spec: str) -> str:
    """``format(value, spec)``, or a dash padded to the spec's width when value is None."""
    if value is None:
        width = spec.split(".")[0]
        return "-".rjust(int(width) if width.isdigit() else 0)
    return format(value, spec)


def print_table(results: dict[str, dict[str, Any]], summary: dict[str, Any]) -> None:
    """A compact table of the results and the checks, on stderr."""
    width = max(len(_short(k)) for k in results)
    print(
        f"{'codec':{width}s} {'enc GB/s':>9s} {'dec GB/s':>9s} {'bits':>8s} {'rel err':>9s} "
        f"{'wall s':>7s}  notes",
        file=sys.stderr,
    )
    for key, e in results.items():
        notes = []
        if "copy_into_preallocated" in e:
            notes.append(
                f"into a preallocated buffer {_fmt(e['copy_into_preallocated']['gbps'], '.3f')}"
            )
        if e.get("bits_per_param_buffer") is not None:
            notes.append(f"buffer {e['bits_per_param_buffer']:.4f} bits")
        if e.get("rel_error_reference_decode") is not None:
            notes.append(f"ref. decode err {e['rel_error_reference_decode']:.2e}")
        notes += [f"{p} {e[p]['error']}" for p in ("encode", "decode") if e[p]["error"]]
        note = "; ".join(notes)
        print(
            f"{_short(key):{width}s} {_fmt(e['encode']['gbps'], '9.3f')} "
            f"{_fmt(e['decode']['gbps'], '9.3f')} {_fmt(e.get('bits_per_param'), '8.4f')} "
            f"{_fmt(e.get('rel_error'), '9.2e')} {e['wall_s']:7.2f}  {note[:120]}",
            file=sys.stderr,
        )
    print_checks(summary["checks"], summary["check_notes"])


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring. Returns the process exit status."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"{QUICK_NUMEL:,} elements, 3 repeats")
    p.add_argument("--json", required=True, help="where to write the JSON results")
    p.add_argument("--png", default=None, help="plot path (default: next to the JSON)")
    p.add_argument("--numel", type=int, default=None, help="override the tensor size (tests)")
    p.add_argument("--repeats", type=int, default=None, help="override the timed repeats")
    a = p.parse_args(argv)

    from locoswarm.compression import CODEC_NAMES

    numel = a.numel or (QUICK_NUMEL if a.quick else FULL_NUMEL)
    repeats = a.repeats or (QUICK_REPEATS if a.quick else FULL_REPEATS)
    print(
        f"codec benchmark ({'quick' if a.quick else 'full'}): {numel:,} fp32 elements, best of "
        f"{repeats}, {torch.get_num_threads()} torch threads, load {os.getloadavg()[0]:.2f}",
        file=sys.stderr,
        flush=True,
    )
    started = time.perf_counter()
    load_before = os.getloadavg()
    x = torch.randn(numel, generator=torch.Generator().manual_seed(SEED), dtype=torch.float32)

    results: dict[str, dict[str, Any]] = {}
    keys = ["memcpy"]
    keys += [f"locoswarm/{n}" for n in CODEC_NAMES]
    keys += [f"hivemind/{n}" for n in HIVEMIND_CODECS]
    for key in keys:
        family, _, name = key.partition("/")
        if family == "memcpy":
            e = bench_memcpy(x, repeats)
        elif family == "locoswarm":
            e = bench_locoswarm(name, x, repeats)
        else:
            e = bench_hivemind(name, x, repeats)
        results[key] = e
        gc.collect()
        print(
            f"  {key}: enc {_fmt(e['encode']['gbps'], '.3f')} "
            f"dec {_fmt(e['decode']['gbps'], '.3f')} GB/s in {e['wall_s']:.1f}s",
            file=sys.stderr,
            flush=True,
        )
    summary = summarise(results)

    import hivemind

    out = {
        "header": {
            "mode": "quick" if a.quick else "full",
            "numel": numel,
            "input": f"fp32 N(0,1), torch.randn with torch.Generator().manual_seed({SEED})",
            "repeats": repeats,
            "warmup": 1,
            "gb": "1e9 bytes of fp32 input: 4 * numel / best seconds (decode too)",
            "bits_per_param": "8 * payload bytes / numel; locoswarm: len(Encoded.payload) "
            "(block scales and top-k indices included; the Encoded header fields are not); "
            "hivemind: bits_per_param_serialized = len(msg.SerializeToString()), "
            "bits_per_param_buffer = len(msg.buffer)",
            "hivemind_timing": "encode = compress(x, info, allow_inplace=False) -> protobuf "
            "(serialization not timed); decode = extract(msg)",
            "block_size": BLOCK_SIZE,
            "topk_ratio": TOPK_RATIO,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "torch_version": torch.__version__,
            "numpy_version": np.__version__,
            "hivemind_version": hivemind.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "processor": platform.processor() or None,
            # Other work on the host skews every figure; 1/5/15-minute load averages.
            "loadavg_before": list(load_before),
            "loadavg_after": list(os.getloadavg()),
        },
        "results": results,
        **summary,
        "wall_s": time.perf_counter() - started,
    }
    del x
    json_path = Path(a.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(_finite(out), indent=1, default=str))
    png = Path(a.png) if a.png else json_path.with_suffix(".png")
    plot(results, png)
    print_table(results, summary)
    print(f"wrote {json_path} and {png} in {out['wall_s']:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
