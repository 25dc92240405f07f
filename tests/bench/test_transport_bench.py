"""The transport benchmark end to end on a tiny payload: every method, the ratios, the plot, and
no process left behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil
import pytest

from bench.transport import METHODS, main


def _processes() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, process group, session) of every process, zombies included."""
    procs = {}
    for proc in psutil.process_iter():
        try:
            procs[proc.pid] = (proc.ppid(), os.getpgid(proc.pid), os.getsid(proc.pid))
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    return procs


def _command(pid: int) -> str | None:
    """The command line of ``pid``; None if it is gone. A zombie is gone: it is dead, and its
    parent (the test worker, a child subreaper: tests/conftest.py) has not reaped it."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return " ".join(proc.cmdline())
    except psutil.Error:
        return None


def _leftovers(root: int, groups: set[int]) -> list[str]:
    """Processes descended from ``root``, or in a process group or session in ``groups``."""
    procs = _processes()
    found = []
    for pid, (_ppid, pgrp, sid) in procs.items():
        if pid == root:
            continue
        chain, seen = pid, set()
        while chain in procs and chain not in seen and chain > 1:
            seen.add(chain)
            chain = procs[chain][0]
            if chain == root:
                break
        if chain == root or pgrp in groups or sid in groups:
            cmd = _command(pid)
            if cmd is None:
                continue
            found.append(f"{pid}: {cmd.strip()[:120]}")
    return found


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_quick_run_on_a_tiny_payload_measures_every_method(tmp_path: Path) -> None:
    out = tmp_path / "transport.json"
    before = set(_leftovers(os.getpid(), set()))
    rc = main(["--quick", "--bytes", "2000000", "--repeats", "1", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())

    header = data["header"]
    assert header["bytes"] == 2_000_000
    assert header["repeats"] == 1
    for key in ("cpu_count", "python", "grpcio_version", "hivemind_version", "torch_version"):
        assert header[key], key
    assert header["chunk_bytes"] > 0
    assert "node's C allocator settings" in header["allocator"]
    assert "2 * bytes" in header["gb_per_s"]
    assert header["date"]

    results = data["results"]
    assert set(results) == set(METHODS)
    for method, entry in results.items():
        if method == "hivemind" and entry["error"] is not None:
            # A failure is recorded as "<type>: <message>", never raised.
            assert ": " in entry["error"]
            assert entry["seconds"] is None
            continue
        assert entry["error"] is None, (method, entry["error"])
        assert entry["seconds"] > 0, method
        assert entry["gbps"] > 0, method
        assert len(entry["times_s"]) == 1, method
        assert len(entry["warmup_s"]) == 1, method
        assert entry["verified"] is True, method
        assert entry["includes"], method
    assert results["raw_tcp_tls"]["listen"]["tls_version"].startswith("TLS")
    for method in ("locoswarm", "locoswarm_tls"):
        timed = [r for r in results[method]["rounds"] if not r["warmup"]]
        assert timed[0]["dial_tensor_ops_s"] >= 0, method

    for name in (
        "hivemind_s_over_locoswarm_s",
        "locoswarm_gbps_over_raw_tcp_gbps",
        "locoswarm_tls_cost",
    ):
        assert name in data["ratios"], name
    assert data["ratios"]["locoswarm_gbps_over_raw_tcp_gbps"] > 0
    checks = data["checks"]
    assert len(checks) == 3
    assert all(v is None or isinstance(v, bool) for v in checks.values()), checks
    for check, ok in checks.items():
        if ok is None:
            assert data["check_notes"][check], check

    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    groups = {pid for entry in results.values() for pid in entry["worker_pids"]}
    assert len(groups) == 2 * len(METHODS)
    left = [p for p in _leftovers(os.getpid(), groups) if p not in before]
    assert not left, left
