"""A bad replica in the simulator: clipping keeps the honest ones within reach of a clean run."""

from __future__ import annotations

from dataclasses import replace

import pytest

from locoswarm.sim.config import SimConfig
from locoswarm.sim.swarm import run_sim
from locoswarm.sync.round_config import default_round_config
from locoswarm.tasks.task import TaskConfig

TASK = TaskConfig(name="tiny", batch_size=2, seq_len=16, val_batches=1, max_bytes=50_000)


def _honest_losses(attack: str | None, *, clip: bool = True) -> list[float]:
    rc = replace(default_round_config("noloco"), clip=clip)
    cfg = SimConfig(
        strategy="noloco",
        num_replicas=4,
        rounds=8,
        inner_steps=5,
        task=TASK,
        sync=rc,
        attack=attack,
        attackers=(3,) if attack else (),
    )
    result = run_sim(cfg)
    return result.val_loss_per_replica[:3]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_bad_replica_is_clipped_and_without_clipping_it_wrecks_the_others() -> None:
    clean = sum(_honest_losses(None)) / 3
    for attack in ("scale", "invert", "noise"):
        assert max(_honest_losses(attack)) <= 1.05 * clean, attack
    # The same attack with clipping off: the check above can fail.
    assert max(_honest_losses("scale", clip=False)) > 2 * clean
