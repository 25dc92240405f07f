"""The in-process swarm: each strategy's communication, bytes, invariants and fault modelling."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from locoswarm.errors import ConfigError
from locoswarm.sim.config import NetworkModel, SimConfig
from locoswarm.sim.swarm import Swarm, run_sim
from locoswarm.sync.diloco import DiLoCoConfig
from locoswarm.sync.noloco import NoLoCoConfig
from locoswarm.tasks.task import TaskConfig

TASK = TaskConfig(name="tiny", batch_size=2, seq_len=16, val_batches=1, max_bytes=50_000)


def _cfg(strategy: str, **kw: object) -> SimConfig:
    base: dict[str, object] = {
        "strategy": strategy,
        "num_replicas": 4,
        "rounds": 3,
        "inner_steps": 2,
        "task": TASK,
    }
    return SimConfig(**{**base, **kw})  # type: ignore[arg-type]


def _params(swarm: Swarm) -> int:
    return swarm.num_parameters


def test_solo_sends_nothing_and_replicas_drift_apart() -> None:
    result = run_sim(_cfg("solo")).to_dict()
    assert result["final"]["bytes_sent_per_replica"] == [0.0] * 4
    assert result["final"]["spread"] > 0
    assert all(f == 0.0 for f in result["final"]["idle_fraction_per_replica"])


def test_ddp_keeps_replicas_identical_and_counts_ring_allreduce_bytes() -> None:
    swarm = Swarm(_cfg("ddp"))
    result = swarm.run().to_dict()
    assert result["final"]["spread"] == 0.0
    per_step = 2 * 3 / 4 * _params(swarm) * 4
    assert result["final"]["bytes_sent_per_replica"] == [pytest.approx(6 * per_step)] * 4


def test_noloco_pairs_swap_theta_once_per_round() -> None:
    swarm = Swarm(_cfg("noloco"))
    result = swarm.run().to_dict()
    assert result["final"]["bytes_sent_per_replica"] == [3.0 * _params(swarm) * 4] * 4
    curve = result["curve"]
    assert [p["inner_step"] for p in curve] == [2, 4, 6]
    assert curve[-1]["val_loss_mean"] < curve[0]["val_loss_mean"] + 1e-3


def test_noloco_general_gamma_sends_theta_and_phi() -> None:
    cfg = _cfg("noloco", noloco=NoLoCoConfig(gamma=1.0))
    swarm = Swarm(cfg)
    result = swarm.run().to_dict()
    assert result["final"]["bytes_sent_per_replica"] == [3.0 * 2 * _params(swarm) * 4] * 4


def test_odd_replica_count_forms_a_triple() -> None:
    swarm = Swarm(_cfg("noloco", num_replicas=3, rounds=1))
    result = swarm.run().to_dict()
    # One group of three: each member sends theta to the two others.
    assert result["final"]["bytes_sent_per_replica"] == [2.0 * _params(swarm) * 4] * 3


def test_runs_are_deterministic_for_a_seed() -> None:
    a = run_sim(_cfg("noloco")).to_dict()
    b = run_sim(_cfg("noloco")).to_dict()
    c = run_sim(_cfg("noloco", seed=1)).to_dict()
    assert a["curve"] == b["curve"]
    assert a["curve"] != c["curve"]


def test_diloco_keeps_replicas_identical() -> None:
    result = run_sim(_cfg("diloco")).to_dict()
    assert result["final"]["spread"] == pytest.approx(0.0, abs=1e-7)
    assert result["final"]["val_loss_per_replica"] == pytest.approx(
        [result["final"]["val_loss_per_replica"][0]] * 4, abs=1e-6
    )


def test_single_replica_diloco_with_unit_lr_and_no_momentum_is_local_training() -> None:
    """STYLE 3.10: DiLoCo with one peer, outer lr 1 and no momentum equals plain training."""
    local = Swarm(_cfg("solo", num_replicas=1))
    local.run()
    outer = Swarm(_cfg("diloco", num_replicas=1, diloco=DiLoCoConfig(lr=1.0, momentum=0.0)))
    outer.run()
    assert torch.allclose(local.replicas[0].theta(), outer.replicas[0].theta(), atol=1e-6)


def test_missed_rounds_are_counted_and_cost_no_bytes() -> None:
    swarm = Swarm(_cfg("noloco", rounds=6, miss_prob=0.5))
    result = swarm.run().to_dict()["final"]
    missed = result["rounds_missed_per_replica"]
    assert sum(missed) > 0
    for sent, m in zip(result["bytes_sent_per_replica"], missed, strict=True):
        assert sent <= (6 - m) * 2 * _params(swarm) * 4


def test_a_slow_replica_stalls_diloco_more_than_noloco() -> None:
    net = NetworkModel(speeds=(1.0, 1.0, 1.0, 0.25), latency_s=0.0)
    diloco = run_sim(_cfg("diloco", network=net)).to_dict()["final"]["idle_fraction_per_replica"]
    noloco = run_sim(_cfg("noloco", network=net)).to_dict()["final"]["idle_fraction_per_replica"]
    # In DiLoCo every fast replica waits for the slow one each round; in NoLoCo only its partner.
    assert sum(noloco[:3]) < sum(diloco[:3])
    assert diloco[3] < diloco[0]


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="strategy"):
        _cfg("allreduce")
    with pytest.raises(ConfigError, match="speeds"):
        _cfg("noloco", network=NetworkModel(speeds=(1.0, 2.0)))
    with pytest.raises(ConfigError, match="miss_prob"):
        replace(_cfg("noloco"), miss_prob=1.5)
