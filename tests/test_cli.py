"""``locoswarm sim`` as a user runs it: a real subprocess, its exit code, output and JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SMALL = [
    "--replicas",
    "2",
    "--rounds",
    "2",
    "--inner-steps",
    "2",
    "--batch-size",
    "2",
    "--seq-len",
    "16",
    "--val-batches",
    "1",
    "--max-bytes",
    "50000",
]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "locoswarm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


@pytest.mark.parametrize("strategy", ["noloco", "diloco", "ddp", "solo"])
def test_sim_writes_the_documented_json(strategy: str, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    proc = _run("sim", "--sync", strategy, *SMALL, "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "round    2/2" in proc.stderr
    data = json.loads(out.read_text())
    final = data["final"]
    for key in (
        "val_loss_mean",
        "val_loss_avg_model",
        "spread",
        "bytes_sent_per_replica",
        "val_loss_per_replica",
        "idle_fraction_per_replica",
    ):
        assert key in final
    assert len(final["bytes_sent_per_replica"]) == 2
    assert [p["inner_step"] for p in data["curve"]] == [2, 4]
    assert data["config"]["strategy"] == strategy


def test_missing_data_path_exits_2_naming_it(tmp_path: Path) -> None:
    proc = _run("sim", *SMALL, "--data", str(tmp_path / "no_such_corpus"))
    assert proc.returncode == 2
    assert "no_such_corpus" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_flag_value_exits_2() -> None:
    proc = _run("sim", "--replicas", "0")
    assert proc.returncode == 2
    assert "num_replicas" in proc.stderr


def test_user_task_plugin_runs(tmp_path: Path) -> None:
    out = tmp_path / "plugin.json"
    proc = _run(
        "sim",
        "--task",
        "tests.unit.tasks.sample_plugin:make",
        "--replicas",
        "2",
        "--rounds",
        "3",
        "--inner-steps",
        "5",
        "--lr",
        "0.05",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    curve = json.loads(out.read_text())["curve"]
    assert curve[-1]["val_loss_mean"] < curve[0]["val_loss_mean"]


def test_outer_optimizer_defaults_follow_the_strategy() -> None:
    from locoswarm.node.cli import build_parser, sim_config_from_args

    def cfg(*args: str):
        return sim_config_from_args(build_parser().parse_args(["sim", *args]))

    assert (cfg("--sync", "diloco").diloco.lr, cfg("--sync", "diloco").diloco.momentum) == (
        0.7,
        0.9,
    )
    assert cfg("--sync", "diloco", "--heavy-ball").diloco.momentum == 0.3
    assert (cfg("--sync", "noloco").noloco.alpha, cfg("--sync", "noloco").noloco.beta) == (0.5, 0.7)
    ef = cfg("--sync", "ef", "--codec", "int4")
    assert (ef.diloco.lr, ef.diloco.momentum, ef.compression.codec) == (1.0, 0.0, "int4")
    assert ef.h == 10
    assert cfg("--sync", "ef", "--outer-momentum", "0.5").diloco.momentum == 0.5
