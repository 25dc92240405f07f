"""``locoswarm sim`` as a user runs it: a real subprocess, its exit code, output and JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from locoswarm.errors import ConfigError
from locoswarm.node.cli import build_parser, sim_config_from_args
from locoswarm.sim.config import SimConfig
from locoswarm.sync.round_config import default_round_config

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


@pytest.mark.parametrize("strategy", ["noloco", "diloco", "ef", "ddp", "solo"])
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
        "wrapped_blocks",
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


def _parse(*args: str) -> SimConfig:
    return sim_config_from_args(build_parser().parse_args(["sim", *args]))


@pytest.mark.parametrize("strategy", ["noloco", "diloco", "ef"])
def test_round_defaults_are_the_daemons(strategy: str) -> None:
    cfg = _parse("--sync", strategy)
    assert cfg.sync == default_round_config(strategy)  # type: ignore[arg-type]
    assert (cfg.inner_steps, cfg.group_size, cfg.overlap) == (50, 2, True)
    assert cfg.pairing is None  # the daemon's default for the mode
    assert cfg.schedule == ("hypercube" if strategy == "diloco" else "random")
    assert cfg.apply_delay is None


@pytest.mark.parametrize("strategy", ["ddp", "solo"])
def test_ddp_and_solo_have_no_round(strategy: str) -> None:
    cfg = _parse("--sync", strategy)
    assert cfg.sync is None
    assert cfg.round_config is None


def test_round_flags_override_the_defaults() -> None:
    diloco = _parse(
        "--sync", "diloco", "--outer-lr", "0.5", "--outer-momentum", "0.8", "--bits", "8",
        "--momentum-bits", "32", "--block-size", "128", "--pairing", "hypercube", "--blocking",
    )  # fmt: skip
    assert diloco.sync is not None
    assert (diloco.sync.lr, diloco.sync.momentum, diloco.sync.bits) == (0.5, 0.8, 8)
    assert (diloco.sync.momentum_bits, diloco.sync.block_size) == (32, 128)
    assert diloco.sync.share_momentum
    assert (diloco.pairing, diloco.overlap) == ("hypercube", False)
    private = _parse("--sync", "diloco", "--private-momentum", "--bits", "32")
    assert private.sync is not None
    assert not private.sync.share_momentum
    noloco = _parse("--sync", "noloco", "--gamma", "1.0", "--apply-delay", "10")
    assert noloco.sync is not None
    assert noloco.sync.gamma == 1.0
    assert not noloco.sync.theta_only
    assert noloco.apply_delay == 10
    assert _parse("--sync", "noloco", "--apply-delay", "0").apply_delay == 0  # lands at once
    ef = _parse("--sync", "ef", "--bits", "1", "--no-error-feedback")
    assert ef.sync is not None
    assert (ef.sync.bits, ef.sync.error_feedback, ef.sync.design) == (1, False, "siq")
    pull = _parse("--sync", "ef", "--design", "pull", "--pull-every", "4", "--codec", "sign")
    assert pull.sync is not None
    assert (pull.sync.design, pull.sync.pull_every, pull.sync.codec) == ("pull", 4, "sign")


def test_group_size_zero_is_the_fp32_all_reduce_reference() -> None:
    cfg = _parse("--sync", "diloco", "--group-size", "0")
    assert cfg.group_size == 0
    assert cfg.sync is not None
    assert (cfg.sync.bits, cfg.sync.momentum_bits) == (32, 32)
    assert cfg.sync.share_momentum
    assert cfg.sync.momentum == 0.9
    with pytest.raises(ConfigError, match="bits 32"):
        _parse("--sync", "diloco", "--group-size", "0", "--bits", "16")


def test_network_and_task_flags() -> None:
    cfg = _parse(
        "--replicas", "3", "--speeds", "1,0.5,2", "--bandwidth-mbit", "8", "--latency-s", "0.2",
        "--step-time-s", "0.5", "--miss-prob", "0.1", "--max-bytes", "1000", "--lr", "0.01",
        "--warmup-steps", "5", "--inner-steps", "7", "--rounds", "3", "--eval-every", "2",
    )  # fmt: skip
    assert cfg.network.speeds == (1.0, 0.5, 2.0)
    assert cfg.network.bandwidth_bytes_per_s == 1e6
    assert (cfg.network.latency_s, cfg.network.step_time_s) == (0.2, 0.5)
    assert (cfg.miss_prob, cfg.task.max_bytes, cfg.inner.lr, cfg.inner.warmup_steps) == (
        0.1,
        1000,
        0.01,
        5,
    )
    assert (cfg.inner_steps, cfg.rounds, cfg.eval_every) == (7, 3, 2)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("--sync", "solo", "--bits", "4"), "--bits"),
        (("--sync", "ddp", "--outer-lr", "0.5"), "--outer-lr"),
        (("--sync", "ddp", "--blocking"), "--blocking"),
        (("--sync", "solo", "--group-size", "0"), "--group-size"),
        (("--sync", "noloco", "--bits", "4"), "--bits"),
        (("--sync", "diloco", "--gamma", "1.0"), "--gamma"),
        (("--sync", "ef", "--share-momentum"), "--share-momentum"),
        (("--sync", "diloco", "--no-error-feedback"), "--no-error-feedback"),
        (("--sync", "diloco", "--design", "pull"), "--design"),
        (("--sync", "ef", "--codec", "int8"), "--design pull"),
        (("--sync", "ef", "--group-size", "4"), "--group-size"),
        (("--sync", "diloco", "--private-momentum", "--momentum-bits", "8"), "--momentum-bits"),
        (("--sync", "noloco", "--blocking", "--apply-delay", "5"), "--apply-delay"),
        (("--sync", "noloco", "--apply-delay", "-1"), "apply_delay"),
        (("--sync", "noloco", "--inner-steps", "5", "--apply-delay", "6"), "apply_delay"),
        (("--sync", "ef", "--bits", "32"), "below 32"),
        (("--sync", "ef", "--block-size", "0"), "block_size"),
        (("--sync", "diloco", "--outer-momentum", "1.0"), "momentum"),
        (("--group-size", "1"), "group_size"),
        (("--inner-steps", "0"), "inner_steps"),
        (("--bandwidth-mbit", "0"), "bandwidth"),
    ],
)
def test_bad_combinations_are_config_errors(args: tuple[str, ...], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        _parse(*args)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "args",
    [
        ("--heavy-ball",),
        ("--error-feedback", "econtrol"),
        ("--eta", "0.5"),
        ("--topk-ratio", "0.1"),
        ("--share-momentum", "--private-momentum"),
        ("--pairing", "ring"),
        ("--bits", "3"),
        ("--design", "push"),
        ("--codec", "zstd"),
    ],
)
def test_removed_or_malformed_flags_are_usage_errors(
    args: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["sim", *args])
    assert info.value.code == 2
    capsys.readouterr()


def test_a_flag_the_mode_ignores_exits_2_naming_it() -> None:
    proc = _run("sim", "--sync", "solo", "--bits", "4", *SMALL)
    assert proc.returncode == 2
    assert "--bits" in proc.stderr
    assert "Traceback" not in proc.stderr
