"""The swarm benchmark end to end in its quick form: real daemons in every configuration, the
plain-training baselines, the memory comparison, the checks, the plot, and no process left."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench.swarm import BASELINE_VARIANTS, TINY_CONFIGS, histogram_quantile, main, parse_metrics
from locoswarm.node import processes as procs


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(180)
def test_quick_run_measures_idle_bytes_exchanges_and_memory(tmp_path: Path) -> None:
    out = tmp_path / "swarm.json"
    children_before = procs.descendants(os.getpid())
    argv = ["--quick", "--rounds", "4", "--json", str(out), "--log-dir", str(tmp_path / "logs")]
    assert main(argv) == 0
    data = json.loads(out.read_text())

    header = data["header"]
    assert header["mode"] == "quick"
    assert header["nodes"] == 2
    assert header["rounds"] >= 1
    assert header["inner_steps"] >= 1
    assert header["max_upload_mbps"] > 0
    assert header["cpu_count"] > 0
    for dist in ("python", "torch", "hivemind", "grpcio"):
        assert header["versions"][dist], dist
    assert header["date"]

    assert list(data["configs"]) == [name for name, _, _ in TINY_CONFIGS]
    pids: set[int] = set()
    groups: set[int] = set()
    for name, config in data["configs"].items():
        assert config["error"] is None, (name, config["error"])
        assert config["leftover_pids"] == []
        assert len(config["nodes"]) == 2
        for node in config["nodes"]:
            where = (name, node["name"])
            pids |= set(node["pids_seen"])
            groups.add(node["pgid"])
            assert node["exit_code"] == 0, (where, node.get("log_tail"))
            assert node["log"]["finished"], where
            assert node["log"]["rounds_done"] >= 1, where
            assert node["scrapes"] >= 1, where
            assert node["parameters"] > 0, where
            idle = node["idle_fraction"]
            assert idle is None or 0.0 <= idle <= 1.0, where
            assert node["compute_s"] >= 0, where
            assert node["idle_s"] >= 0, where
            assert set(node["exchanges"]) >= {"ok", "solo", "failed"}, where
            assert all(v >= 0 for v in node["exchanges"].values()), where
            if node["log"]["rounds_exchanged"] > 0 and node["exchanges"]["ok"] > 0:
                assert node["sent_bytes"] > 0, where
                assert node["received_bytes"] > 0, where
            assert node["final_loss"] is not None, where
            assert node["final_loss"] > 0, where
            assert node["vmhwm_bytes"] > 0, where
            assert node["dht_vmhwm_bytes"] > 0, where
            assert node["loop_lag_samples"] > 0, where  # the lag probe ran
            assert 0 < node["loop_lag_p99_s"] <= 2.5, where
        summary = config["summary"]
        assert summary["rounds_done"] >= 2
        for key in ("idle_fraction_mean", "idle_fraction_max"):
            value = summary[key]
            assert value is None or 0.0 <= value <= 1.0, (name, key)
    # the swarm exchanged at all somewhere (three configurations, each over several rounds)
    assert sum(c["summary"]["rounds_exchanged"] for c in data["configs"].values()) > 0

    tiny = data["baselines"]["tiny"]
    assert set(tiny) == set(BASELINE_VARIANTS)
    for variant, base in tiny.items():
        assert base["error"] is None, (variant, base["error"])
        assert base["vmhwm_bytes"] > 0
        assert base["parameters"] == 287_296
        assert base["steps"] == header["rounds"] * header["inner_steps"]

    memory = data["memory"]["tiny"]
    assert memory["parameters"] == 287_296
    assert memory["fp32_copy_bytes"] == 4 * 287_296
    assert memory["meaningful"] is False
    assert len(memory["nodes"]) == 2 * len(TINY_CONFIGS)
    for row in memory["nodes"]:
        for variant in BASELINE_VARIANTS:
            over = row[f"overhead_vs_{variant}_bytes"]
            copies = row[f"overhead_vs_{variant}_copies"]
            assert over == row["vmhwm_bytes"] - tiny[variant]["vmhwm_bytes"]
            assert copies == pytest.approx(over / memory["fp32_copy_bytes"])

    assert data["checks"], data
    assert all(ok in (True, False, None) for ok in data["checks"].values())
    assert any(name.startswith("overlap noloco: idle") for name in data["checks"])
    assert any(name.startswith("memory (tiny)") for name in data["checks"])

    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # nothing left behind: no node, DHT process, p2pd or baseline, by pid or process group
    assert procs.wait_gone(pids) == set()
    for group in groups:
        assert procs.wait_gone(procs.in_group(group)) == set(), group
    assert procs.descendants(os.getpid()) - children_before == set()


def test_histogram_quantile_is_the_upper_bound_of_the_bucket_that_holds_it() -> None:
    text = "\n".join(
        [
            "# TYPE lag_seconds histogram",
            'lag_seconds_bucket{le="0.01"} 90.0',
            'lag_seconds_bucket{le="0.05"} 98.0',
            'lag_seconds_bucket{le="0.1"} 100.0',
            'lag_seconds_bucket{le="+Inf"} 100.0',
            "lag_seconds_count 100.0",
            "lag_seconds_sum 1.0",
            "",
        ]
    )
    samples = parse_metrics(text)
    assert histogram_quantile(samples, "lag_seconds", 0.5) == 0.01
    assert histogram_quantile(samples, "lag_seconds", 0.9) == 0.01
    assert histogram_quantile(samples, "lag_seconds", 0.98) == 0.05
    assert histogram_quantile(samples, "lag_seconds", 0.99) == 0.1
    assert histogram_quantile(samples, "missing", 0.99) is None


def test_the_plain_baseline_trains_the_batch_size_and_length_it_is_given(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--role", "plain", "--task", "tiny", "--steps", "1", "--max-bytes", "20000"]
    assert main([*argv, "--batch-size", "3", "--seq-len", "16"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["batch_size"], report["seq_len"], report["steps"]) == (3, 16, 1)
    assert report["vmhwm_bytes"] > 0
