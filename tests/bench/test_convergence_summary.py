"""The convergence benchmark's bookkeeping: target checks and plots from given run results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.convergence import FULL, QUICK, method_configs, plot, summarise


def _run(loss: float, sent: float, rounds: int = 10) -> dict[str, Any]:
    point = {"inner_step": 100, "val_loss_mean": loss, "bytes_sent_mean": sent, "spread": 0.1}
    return {
        "config": {"rounds": rounds, "inner_steps": 10},
        "final": {
            "val_loss_mean": loss,
            "val_loss_avg_model": loss,
            "spread": 0.1,
            "bytes_sent_mean": sent,
        },
        "curve": [point],
        "wall_s": 1.0,
    }


def _runs(noloco: float, diloco: float, noloco_sent: float) -> dict[str, list[dict[str, Any]]]:
    return {
        "ddp": [_run(1.0, 1000.0)],
        "noloco": [_run(noloco, noloco_sent)],
        "diloco_heavyball_2h": [_run(diloco, noloco_sent)],
        "diloco_nesterov_h": [_run(diloco, 2 * noloco_sent)],
        "solo": [_run(2.0, 0.0)],
    }


def test_checks_pass_when_targets_hold() -> None:
    s = summarise(_runs(noloco=1.2, diloco=1.25, noloco_sent=10.0))
    assert all(s["checks"].values()), s["checks"]
    assert abs(s["figures"]["gap_closed_by_noloco"] - 0.8) < 1e-9
    assert s["figures"]["ddp_bytes_over_noloco_bytes"] == 100.0


def test_checks_fail_when_targets_are_missed() -> None:
    s = summarise(_runs(noloco=1.5, diloco=1.4, noloco_sent=100.0))
    assert s["checks"]["ddp < noloco < solo"]
    assert not s["checks"]["noloco <= 1.01 x diloco (heavy-ball, 2H)"]
    assert not s["checks"]["noloco closes >= 70% of the solo-ddp gap"]
    assert not s["checks"]["noloco sends >= 25x fewer bytes than ddp"]


def test_plot_writes_a_png(tmp_path: Path) -> None:
    out = tmp_path / "plot.png"
    plot(_runs(noloco=1.2, diloco=1.25, noloco_sent=10.0), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_regimes_give_every_local_method_enough_outer_steps() -> None:
    cfgs = method_configs(FULL, seed=0)
    for name in ("noloco", "diloco_heavyball_2h", "diloco_nesterov_h"):
        assert cfgs[name].rounds >= 100, name
    assert cfgs["diloco_heavyball_2h"].h == 2 * cfgs["noloco"].h
    assert all(c.total_steps == FULL.total_steps for c in cfgs.values())
    assert all(c.total_steps == QUICK.total_steps for c in method_configs(QUICK, 0).values())
