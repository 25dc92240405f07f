"""Nodes of several local ranks (``--nproc-per-node``), on CPU with the gloo backend.

Real ``locoswarm run`` processes: the launcher starts the ranks as its children in its process
group; rank 0 is the daemon, rank 1 trains with it through DDP.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest
import torch

from locoswarm.node.checkpoint import load_latest
from locoswarm.sim.replay import round_events
from tests.integration.conftest import Node, Nodes

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TASK = ("--task", "tests.integration.rank_task:task", "--device", "cpu", "--warmup-steps", "0")


def _ranks(node: Node) -> dict[int, psutil.Process]:
    """The node's rank processes by local rank (each logs its pid when it starts)."""
    found = {}
    for rank in (0, 1):
        pid = int(node.wait_for(rf"rank {rank} of 2 \(gloo, cpu\), pid (\d+)").group(1))
        proc = psutil.Process(pid)
        assert proc.pid in {p.pid for p in psutil.Process(node.proc.pid).children(True)}
        found[rank] = proc
    return found


def _outer(directory: Path) -> dict[str, torch.Tensor]:
    found = load_latest(directory)
    assert found is not None, f"no checkpoint in {directory}"
    _, state = found
    return dict(state["outer"]["state"])


def test_two_ranks_take_the_one_rank_outer_step(nodes: Nodes, tmp_path: Path) -> None:
    """Same global batch (16 rows: 16 on one rank, 8 on each of two): the same outer step."""
    flags: tuple[str, ...] = (*TASK, "--sync", "diloco", "--blocking", "--rounds", "2")
    flags += ("--inner-steps", "5")
    flags += ("--match-deadline", "1")
    # --batch-size is per rank; it sets the tokens a node advertises (the plugin's rows are
    # fixed by rank_task.py: 16 on one rank, 8 on each of two).
    one = nodes.start(
        *flags, "--batch-size", "16", "--checkpoint-dir", str(tmp_path / "one"), name="one"
    )
    two = nodes.start(
        *flags,
        *("--nproc-per-node", "2", "--batch-size", "8"),
        *("--checkpoint-dir", str(tmp_path / "two")),
        name="two",
    )
    for node in (one, two):
        assert node.proc.wait(timeout=240) == 0, node.text()
    assert "rank 1 of 2 (gloo, cpu), pid " in two.text()
    a, b = _outer(tmp_path / "one"), _outer(tmp_path / "two")
    # Both ran two solo diloco rounds from the same initial weights; the step is not zero.
    assert float(a["momentum"].abs().max()) > 1e-3
    torch.testing.assert_close(b["phi"], a["phi"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b["momentum"], a["momentum"], rtol=1e-4, atol=1e-6)
    # Each node advertises the tokens of its global batch: the same.
    tokens_one = round_events(one.text())[0]["tokens"]
    tokens_two = round_events(two.text())[0]["tokens"]
    assert list(tokens_one.values()) == list(tokens_two.values())


def test_two_rank_node_pairs_with_one_rank_nodes(nodes: Nodes) -> None:
    flags = ("--rounds", "4", "--inner-steps", "5", "--set", "peers.min_peers=1")
    big = nodes.start(*flags, "--nproc-per-node", "2", "--device", "cpu", name="big")
    join = nodes.join_address(big)
    small = nodes.start(*flags, "--join", join, name="small")
    for node in (big, small):
        assert node.proc.wait(timeout=240) == 0, node.text()
    big_id, small_id = str(big.info()["peer_id"]), str(small.info()["peer_id"])
    events = [e for e in round_events(big.text()) if e["outcome"] == "exchanged"]
    assert events, big.text()
    for event in events:
        assert event["partners"] == [small_id]
        # The two-rank node trained twice the tokens (batch per rank, two ranks): it weighs 2:1.
        assert event["tokens"][big_id] == 2 * event["tokens"][small_id] > 0
    assert any(e["outcome"] == "exchanged" for e in round_events(small.text()))


def test_a_dead_rank_stops_the_node_and_a_restart_resumes(nodes: Nodes, tmp_path: Path) -> None:
    ckpt = str(tmp_path / "ckpt")
    # The built-in task: its batch stream has a position to save and resume.
    flags: tuple[str, ...] = ("--nproc-per-node", "2", "--device", "cpu", "--inner-steps", "10")
    flags += ("--match-deadline", "1", "--checkpoint-dir", ckpt, "--checkpoint-every", "2")
    node = nodes.start(*flags, name="first")
    node.wait_for(r"round 2: ", timeout_s=120)
    ranks = _ranks(node)
    os.kill(ranks[1].pid, signal.SIGKILL)
    code = node.proc.wait(timeout=120)
    text = node.text()
    assert code == 1, text
    # Rank 0 stops cleanly either way: it notices the lost rank itself (its next collective
    # fails), or the launcher, which polls its children every 0.5 s, saw rank 1 gone first and
    # sent rank 0 a SIGTERM.
    stopping = max(text.find("stopping the node: "), text.find("stopping: finishing"))
    assert stopping >= 0, text
    assert "a rank of this node failed: rank 1" in text, text
    assert text.rfind("checkpoint ") > stopping, text  # the final one
    for proc in ranks.values():
        assert not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    saved = load_latest(Path(ckpt))
    assert saved is not None
    saved_round = int(saved[1]["outer_step"])
    assert saved_round >= 2
    positions = saved[1]["trainer"]["data_ranks"]  # rank 1's, gathered by rank 0
    assert isinstance(positions, list), saved[1]["trainer"].keys()
    assert len(positions) == 1
    assert positions[0] is not None

    again = nodes.start(*flags, name="again")
    again.wait_for(rf"round {saved_round + 1}: ", timeout_s=120)
    assert f"resumed from {saved[0]} at round {saved_round}" in again.text(), again.text()
    assert "rank 1: resumed its data position" in again.text(), again.text()
    first_round = round_events(again.text())[0]["round"]
    assert first_round == saved_round, again.text()
    # Ctrl-C in a terminal: SIGINT to the whole process group, so rank 0 gets it twice (from
    # the terminal and from the launcher) and must still stop gracefully, not force.
    os.killpg(again.proc.pid, signal.SIGINT)
    assert again.proc.wait(timeout=90) == 0, again.text()
    text = again.text()
    assert "stopped by SIGINT" in text, text
    assert "forced exit" not in text, text
    assert text.rfind("checkpoint ") > text.find("stopping: finishing"), text
