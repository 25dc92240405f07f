"""The round CPU benchmark: a small run writes every mode's phases, its JSON and its PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.common import ROOT


def test_a_small_run_times_every_phase_of_every_mode(tmp_path: Path) -> None:
    out = tmp_path / "round_cpu.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.round_cpu",
            "--numel",
            "200000",
            "--rounds",
            "3",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    data = json.loads(out.read_text())
    assert data["header"]["numel"] == 200_000
    assert set(data["cpu_s"]) == {"noloco", "diloco", "ef"}
    for phases in data["cpu_s"].values():
        assert set(phases) == {"prepare", "decode", "apply", "total"}
        assert all(v >= 0 for v in phases.values())
        assert phases["total"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
    assert "diloco" in run.stderr


def test_bad_arguments_are_refused_with_what_was_wrong(tmp_path: Path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.round_cpu",
            "--rounds",
            "1",
            "--json",
            str(tmp_path / "x.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert "--rounds >= 2" in run.stderr
