"""The simulator replays a real swarm: same schedule and seeds, the same outer weights bit for bit.

Three real ``locoswarm run`` processes (CPU, one torch thread) train and exchange; each logs one
``round-event`` per round. ``locoswarm.sim.replay`` rebuilds the three nodes, drives the shared
round algorithm (``sync/rounds.py``) with the logged partners and outcomes, and must reproduce
every node's theta snapshot and new phi digest at every round.
"""

from __future__ import annotations

import pytest
import torch

from locoswarm.node.config import load_config
from locoswarm.sim.replay import parse_log, replay
from tests.integration.conftest import Nodes

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROUNDS = 12
H = 5


@pytest.mark.parametrize("mode", ["noloco", "diloco", "ef"])
def test_simulator_reproduces_every_nodes_outer_weights(nodes: Nodes, mode: str) -> None:
    flags: tuple[str, ...] = ("--sync", mode, "--rounds", str(ROUNDS), "--inner-steps", str(H))
    flags += ("--set", "peers.min_peers=2")  # the three start their first round together
    first = nodes.start(*flags)
    join = nodes.join_address(first)
    others = [nodes.start(*flags, "--join", join) for _ in range(2)]
    for node in [first, *others]:
        assert node.proc.wait(timeout=240) == 0, node.text()
    logs = [parse_log(node.text()) for node in [first, *others]]
    exchanged = [sum(e["outcome"] == "exchanged" for e in log.events) for log in logs]
    # A replay of solo steps would prove little: at least two nodes must have exchanged twice.
    # Not all three: under a loaded machine one node can reach its rounds late and be left out
    # of most pairs (seen once in CI: [12, 11, 1]); its solo rounds are replayed all the same.
    assert sorted(exchanged)[-2] >= 2, exchanged

    config = load_config(
        None, {"sync.mode": mode, "task.max_bytes": 200000, "sync.inner_steps": H}, {}
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the nodes ran (--threads 1)
    try:
        rows = replay(
            logs,
            rc=config.sync.round_config,
            task=config.task,
            inner=config.trainer.inner,
            inner_steps=H,
            total_rounds=ROUNDS,
            seed=0,
            overlap=True,
        )
    finally:
        torch.set_num_threads(threads)
    assert len(rows) == sum(len(log.events) for log in logs)
    wrong = [row for row in rows if not row.matches]
    assert wrong == [], wrong[:3]
