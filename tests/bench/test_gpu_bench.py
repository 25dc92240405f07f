"""The GPU benchmark: its quick CPU run end to end (plain alone, two plain workers at once, a
2-node swarm; every figure present), its one-line refusal without CUDA, its window arithmetic,
and the node's peak-device-memory gauge it reads."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from bench.gpu import (
    CHECK_MEMORY,
    CHECK_TOKENS,
    Sample,
    change_points,
    parse_compute_apps,
    swarm_window,
    window_rates,
)
from locoswarm.node import processes as procs
from locoswarm.node.config import NodeConfig
from locoswarm.node.metrics import NodeMetrics
from locoswarm.node.report import Reporter

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu.py"
GAUGE = "locoswarm_trainer_device_memory_peak_bytes"


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_quick_cpu_run_measures_plain_concurrent_and_swarm(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--json", str(out)]
    done = subprocess.run(
        [*cmd, "--log-dir", str(tmp_path / "logs")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["complete"] is True

    header = data["header"]
    assert header["mode"] == "quick"
    assert header["device"] == "cpu"
    assert header["task"] == "tiny"
    assert header["parameters"] == 287_296
    assert header["torch"] == torch.__version__
    assert "--quick" in header["command"]
    settings = header["settings"]
    for key in ("batch_size", "seq_len", "steps", "warmup", "rounds", "inner_steps"):
        assert settings[key] >= 1, key
    assert "--join" not in settings["node_args"]
    assert header["definitions"]
    assert data["notes"]["sharing"]

    baselines = data["baselines"]
    (alone,) = baselines["plain_alone"]["workers"]
    assert baselines["plain_alone"]["error"] is None, baselines["plain_alone"]["error"]
    assert alone["exit_code"] == 0
    assert _positive(alone["tokens_per_s"])
    assert alone["tokens_per_step"] == settings["batch_size"] * settings["seq_len"]
    assert alone["steps"] == settings["steps"]
    assert alone["peak_memory_allocated_bytes"] == 0  # CPU
    assert math.isfinite(alone["final_loss"])

    conc = baselines["plain_concurrent"]
    assert conc["error"] is None, conc["error"]
    assert len(conc["workers"]) == 2
    assert _positive(conc["window_s"])
    for worker in conc["workers"]:
        assert worker["exit_code"] == 0
        assert _positive(worker["tokens_per_s"])
        assert _positive(worker["tokens_per_s_shared"])
        assert worker["shared_steps"] >= 1
    assert _positive(conc["tokens_per_s_sum"])

    swarm = data["swarm"]
    assert swarm["error"] is None, swarm["error"]
    assert swarm["leftover_pids"] == []
    assert _positive(swarm["window_s"])
    assert len(swarm["nodes"]) == 2
    for node in swarm["nodes"]:
        where = node["name"]
        assert node["exit_code"] == 0, (where, node.get("log_tail"))
        assert node["log"]["finished"], where
        assert node["device"] == "cpu", where
        assert node["parameters"] == 287_296, where
        assert _positive(node["tokens_per_s"]), where
        assert _positive(node["tokens_per_s_compute_idle"]), where
        assert _positive(node["tokens_per_s_whole_run_compute_idle"]), where
        assert node["window_updates"] >= 2, where
        assert 0.0 <= node["idle_fraction"] <= 1.0, where
        assert 0.0 <= node["idle_fraction_window"] <= 1.0, where
        assert _positive(node["outer_step_s"]), where
        assert _positive(node["outer_step_s_all"]), where
        assert node["exchanges"]["ok"] >= 1, where
        assert node["device_memory_peak_bytes"] == 0, where  # the gauge exists; 0 on CPU
        assert node["gpu_process_memory_bytes"] is None, where
        # nothing left behind: the node's process group is gone
        assert procs.wait_gone(procs.in_group(node["pid"])) == set(), where
    assert _positive(swarm["tokens_per_s_sum"])

    summary = data["summary"]
    for key in (
        "plain_alone_tokens_per_s",
        "plain_concurrent_tokens_per_s_sum",
        "swarm_tokens_per_s_sum",
        "swarm_share_of_plain_alone",
        "concurrent_share_of_plain_alone",
        "outer_step_s_mean",
    ):
        assert _positive(summary[key]), key
    assert math.isfinite(summary["tokens_per_s_loss_vs_concurrent"])
    assert 0.0 <= summary["idle_fraction_max"] <= 1.0
    assert summary["memory_overhead"] is None  # no device memory on a CPU

    assert set(data["checks"]) == {CHECK_TOKENS, CHECK_MEMORY}
    assert isinstance(data["checks"][CHECK_TOKENS], bool)
    assert data["checks"][CHECK_MEMORY] is None
    loss = data["check_values"][CHECK_TOKENS]["loss_vs_concurrent"]
    assert loss == summary["tokens_per_s_loss_vs_concurrent"]
    assert all(data["check_notes"][name] for name in data["checks"])

    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_one_line_error(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cuda", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "CUDA" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not out.exists()


def test_the_metrics_registry_exports_the_device_memory_gauge() -> None:
    registry = NodeMetrics().registry
    samples = {s.name: s.value for m in registry.collect() for s in m.samples}
    assert samples[GAUGE] == 0.0


def _trainer(device: str) -> Any:
    stats = SimpleNamespace(inner_steps=3, compute_s=1.5, idle_s=0.5)
    return SimpleNamespace(stats=stats, tokens_per_step=10, device=torch.device(device))


def _gauge(metrics: NodeMetrics) -> float | None:
    return metrics.registry.get_sample_value(GAUGE)


def test_sync_metrics_sets_the_peak_from_cuda_and_leaves_it_at_0_on_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[torch.device] = []

    def fake_peak(device: torch.device) -> int:
        asked.append(device)
        return 123_456_789

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", fake_peak)
    cpu = NodeMetrics()
    Reporter(NodeConfig(), cpu, {}).sync_metrics(_trainer("cpu"))
    assert _gauge(cpu) == 0.0
    assert asked == []
    assert cpu.registry.get_sample_value("locoswarm_trainer_tokens_total") == 30

    cuda = NodeMetrics()
    Reporter(NodeConfig(), cuda, {}).sync_metrics(_trainer("cuda:0"))
    assert _gauge(cuda) == 123_456_789
    assert asked == [torch.device("cuda:0")]


def _s(t: float, tokens: float, outer: float, compute: float = 0.0, idle: float = 0.0) -> Sample:
    return Sample(t, tokens, tokens / 10, compute, idle, outer, 0.0)


def test_swarm_window_spans_every_node_past_warm_up_and_none_finished() -> None:
    a = [_s(0, 0, 0), _s(1, 10, 0), _s(2, 20, 1), _s(5, 50, 2), _s(8, 80, 3)]
    b = [_s(0.5, 0, 0), _s(3, 30, 1), _s(6, 60, 2), _s(7, 70, 3)]
    assert swarm_window([a, b], rounds=3) == (3, 5)
    assert swarm_window([a, b], rounds=4) == (3, 7)
    assert swarm_window([a, [_s(0, 0, 0)]], rounds=3) is None  # b never past round 1
    assert swarm_window([a, b], rounds=1) is None  # nothing before the last round


def test_window_rates_use_counter_updates_inside_the_window() -> None:
    # The counter moves at t = 1, 2, 3, 4 (each seen by two scrapes, the second a repeat).
    history = [
        _s(0.9, 0, 1),
        _s(1.0, 100, 1, compute=0.9, idle=0.0),
        _s(1.5, 100, 1, compute=0.9, idle=0.0),
        _s(2.0, 200, 1, compute=1.7, idle=0.1),
        _s(2.5, 200, 1, compute=1.7, idle=0.1),
        _s(3.0, 300, 1, compute=2.6, idle=0.1),
        _s(3.5, 300, 1, compute=2.6, idle=0.1),
        _s(4.0, 400, 2, compute=3.4, idle=0.2),
    ]
    assert [p.t for p in change_points(history, (1.0, 3.5))] == [1.0, 2.0, 3.0]
    rates = window_rates(history, (1.0, 3.5))
    assert rates["tokens_per_s"] == pytest.approx(100.0)  # 200 tokens over 2 s
    assert rates["tokens_per_s_compute_idle"] == pytest.approx(200 / 1.8)
    assert rates["untracked_fraction"] == pytest.approx(0.1)
    assert rates["idle_fraction_window"] == pytest.approx(0.1 / 1.8)
    assert rates["window_updates"] == 3
    assert window_rates(history, (1.2, 1.9))["tokens_per_s"] is None  # no update inside
    assert window_rates(history, None)["tokens_per_s"] is None


def test_parse_compute_apps_reads_nvidia_smi_csv() -> None:
    text = "12345, 1024\n678, [N/A]\n\n999, 2.5\n"
    assert parse_compute_apps(text) == {12345: 1024 * 2**20, 999: int(2.5 * 2**20)}
