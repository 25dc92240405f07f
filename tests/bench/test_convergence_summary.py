"""The convergence benchmark's bookkeeping: target checks and plots from given run results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.convergence import FULL, QUICK, method_configs, plot, summarise

PARAMS = 1000
FP32 = 4.0 * PARAMS  # bytes of one fp32 tensor
ROUNDS = 10


def _run(loss: float, per_round: float, *, spread: float = 0.01, overlap: bool = True) -> Any:
    sent = per_round * ROUNDS
    point = {"inner_step": 100, "val_loss_mean": loss, "bytes_sent_mean": sent, "spread": spread}
    return {
        "config": {"rounds": ROUNDS, "inner_steps": 10, "overlap": overlap},
        "num_parameters": PARAMS,
        "final": {
            "val_loss_mean": loss,
            "val_loss_avg_model": loss,
            "spread": spread,
            "bytes_sent_mean": sent,
        },
        "curve": [point],
        "wall_s": 1.0,
    }


def _runs(**override: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every core method with figures that meet every target, some changed by ``override``."""
    table: dict[str, dict[str, Any]] = {
        "ddp": {"loss": 1.0, "per_round": 10 * FP32, "spread": 0.0},
        "solo": {"loss": 2.0, "per_round": 0.0, "spread": 1.0},
        "diloco_allreduce": {"loss": 1.2, "per_round": 1.5 * FP32, "spread": 0.0},
        "noloco": {"loss": 1.3, "per_round": FP32},
        "noloco_blocking": {"loss": 1.3, "per_round": FP32, "overlap": False},
        "diloco": {"loss": 1.205, "per_round": FP32},
        "diloco_blocking": {"loss": 1.2, "per_round": FP32, "overlap": False},
        "ef_4bit": {"loss": 1.22, "per_round": FP32 / 8},
        "ef_4bit_blocking": {"loss": 1.22, "per_round": FP32 / 8, "overlap": False},
        "ef_lowbit": {"loss": 1.25, "per_round": FP32 / 25},
        "ef_lowbit_blocking": {"loss": 1.25, "per_round": FP32 / 25, "overlap": False},
    }
    for name, changes in override.items():
        table[name] = {**table[name], **changes}
    return {
        name: [
            _run(
                row["loss"],
                row["per_round"],
                spread=row.get("spread", 0.01),
                overlap=row.get("overlap", True),
            )
        ]
        for name, row in table.items()
    }


def test_checks_pass_when_targets_hold() -> None:
    s = summarise(_runs())
    assert s["checks"], "no check was evaluated"
    assert all(s["checks"].values()), s["checks"]
    assert s["figures"]["gap_closed_by_diloco"] == pytest.approx(0.795)
    assert s["figures"]["best_pair_mode_gap_closed"] == pytest.approx(0.795)
    assert s["table"]["diloco"]["fp32_tensors_per_round"] == pytest.approx(1.0)
    assert s["table"]["ef_4bit"]["fp32_tensors_per_round"] == pytest.approx(1 / 8)
    assert s["table"]["diloco"]["over_diloco_allreduce"] == pytest.approx(1.205 / 1.2)


def test_checks_fail_when_targets_are_missed() -> None:
    s = summarise(
        _runs(
            diloco={"loss": 1.3, "per_round": 2 * FP32},
            ef_4bit={"per_round": FP32 / 4},
            ef_lowbit={"loss": 1.4},
            noloco={"spread": 0.5},
        )
    )
    checks = s["checks"]
    assert not checks["diloco (pairs) within 1% of all-reduce DiLoCo"]
    assert not checks["diloco sends <= one fp32 tensor per round"]
    assert not checks["ef 4 bits sends >= 7x fewer bytes than fp32"]
    assert not checks["ef at 1-2 bits within 6% of all-reduce DiLoCo"]
    assert not checks["noloco spread <= solo spread / 10"]
    assert not checks["diloco: overlapped costs <= 1% over blocking"]
    assert checks["ef 4 bits within 3% of all-reduce DiLoCo"]


def test_checks_need_the_methods_they_compare() -> None:
    runs = _runs()
    only = {k: runs[k] for k in ("ddp", "solo", "noloco")}
    s = summarise(only)
    assert not any("all-reduce" in c for c in s["checks"])
    assert s["table"]["noloco"]["over_diloco_allreduce"] is None
    assert "best pair mode (noloco) closes >= 65% of the solo-ddp gap" in s["checks"]


def test_plot_writes_a_png(tmp_path: Path) -> None:
    out = tmp_path / "plot.png"
    plot(_runs(), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("regime", [FULL, QUICK])
def test_every_method_runs_the_regimes_steps(regime: Any) -> None:
    cfgs = method_configs(regime, seed=0, suite="all")
    for name, cfg in cfgs.items():
        assert cfg.rounds * cfg.inner_steps == regime.total_steps, name
        assert cfg.num_replicas == regime.replicas, name
    for name in ("noloco", "diloco", "ef_4bit", "ef_lowbit"):
        assert method_configs(FULL, seed=0)[name].rounds >= 100, name
        assert not cfgs[f"{name}_blocking"].overlap
    reference = cfgs["diloco_allreduce"]
    assert reference.group_size == 0
    assert reference.round_config is not None
    assert reference.round_config.bits == 32
