"""Integration: real ``locoswarm run`` processes on 127.0.0.1."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from locoswarm.node import processes as procs
from locoswarm.sim.replay import round_events
from tests.integration.conftest import QUICK, Nodes

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.mark.parametrize("mode", ["noloco", "diloco", "ef"])
def test_three_nodes_join_exchange_and_learn(nodes: Nodes, mode: str) -> None:
    extra: list[str] = []
    first = nodes.start("--sync", mode, "--rounds", "18", *extra)
    join = nodes.join_address(first)
    first.wait_for(r"round 1: ")  # the others join a running swarm: they fetch its state
    others = [
        nodes.start("--sync", mode, "--rounds", "18", "--join", join, *extra) for _ in range(2)
    ]
    for node in [first, *others]:
        assert node.proc.wait(timeout=200) == 0, node.text()
    for node in others:
        assert re.search(r"late join: fetched the outer weights of round [1-9]", node.text()), (
            node.text()
        )
    for node in [first, *others]:
        rounds = node.rounds()
        exchanged = [r for r in rounds if r[1] == "exchanged"]
        assert len(exchanged) >= 3, (node.name, rounds)
        losses = [loss for _, _, loss in rounds]
        assert min(losses[-3:]) < losses[0], (node.name, losses)  # training loss falls


def _digest(text: str, kind: str) -> tuple[int, str, str]:
    found = re.findall(rf"{kind} .* at round (\d+), step \d+: weights (\w+), phi (\w+)", text)
    assert found, text
    round_, weights, phi = found[-1]
    return int(round_), weights, phi


def test_sigterm_then_restart_resumes_with_identical_weights(nodes: Nodes, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    node = nodes.start("--checkpoint-dir", str(ckpt), "--checkpoint-every", "2")
    node.wait_for(r"round 3: ")
    assert node.stop(signal.SIGTERM) == 0
    saved = _digest(node.text(), "checkpoint")
    again = nodes.start("--checkpoint-dir", str(ckpt), name="restarted")
    again.wait_for(r"resumed from")
    assert _digest(again.text(), "resumed") == saved
    # The identity key lives in the checkpoint folder: the restart keeps its peer id.
    assert (ckpt / "identity.key").exists()
    assert again.info()["peer_id"] == node.info()["peer_id"]
    again.wait_for(rf"round {saved[0]}: ")  # it goes on from the saved round
    assert again.stop() == 0


def test_a_second_signal_forces_the_exit_and_kills_the_dht_and_p2pd(nodes: Nodes) -> None:
    node = nodes.start()
    node.wait_for(r"round 1: ")
    below = procs.descendants(node.proc.pid)
    assert below, "a running node has its DHT process and p2pd below it"
    node.proc.send_signal(signal.SIGINT)
    # Signals of one kind do not queue: send the second once the first was handled (soon: the
    # graceful stop it started closes the DHT, which takes longer than this poll).
    deadline = time.monotonic() + 30
    while "signal again to force" not in node.text() and time.monotonic() < deadline:
        time.sleep(0.005)
    node.proc.send_signal(signal.SIGINT)
    assert node.proc.wait(timeout=30) == 130
    assert "forced exit" in node.text()
    assert procs.wait_gone(below) == set()


def test_a_node_restarted_far_behind_the_swarm_fetches_its_state(
    nodes: Nodes, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    first = nodes.start()
    join = nodes.join_address(first)
    second = nodes.start("--join", join, "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2")
    second.wait_for(r"round \d+: exchanged")
    assert second.stop() == 0
    stopped_at = _digest(second.text(), "checkpoint")[0]
    first.wait_for(rf"round {stopped_at + 6}: ")  # the swarm moves past the lag window (2)
    again = nodes.start("--join", join, "--checkpoint-dir", str(ckpt), name="restarted")
    again.wait_for(r"resumed from")
    assert again.info()["peer_id"] == second.info()["peer_id"]
    again.wait_for(r"fetching the swarm's current state instead")
    fetched = again.wait_for(r"late join: fetched the outer weights of round (\d+)")
    assert int(fetched.group(1)) > stopped_at + 2
    again.wait_for(rf"round {fetched.group(1)}: ")  # and trains on from the swarm's round
    assert again.stop() == 0


def test_a_killed_node_does_not_stop_the_others(nodes: Nodes) -> None:
    first = nodes.start()
    join = nodes.join_address(first)
    others = [nodes.start("--join", join) for _ in range(2)]
    for node in [first, *others]:
        node.wait_for(r"round \d+: exchanged")
    victim = others[1]
    victim.stop(signal.SIGKILL)
    survivors = [first, others[0]]
    before = {n.name: len(n.rounds()) for n in survivors}
    for node in survivors:  # both keep training, and exchange again with each other
        node.wait_for(r"round \d+: (exchanged|solo)", timeout_s=30)
        deadline_rounds = before[node.name] + 8
        while len(node.rounds()) < deadline_rounds:
            node.wait_for(rf"round {node.rounds()[-1][0] + 1}: ", timeout_s=60)
        later = node.rounds()[before[node.name] + 2 :]
        assert any(how == "exchanged" for _, how, _ in later), (node.name, node.rounds())


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "locoswarm", "run", *QUICK, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--set", "sync.nonsense=1"], 2, "unknown config key 'sync.nonsense'"),
        (["--inner-steps", "0"], 2, "sync.inner_steps must be >= 1"),
        (["--data", "/nonexistent/corpus"], 2, "/nonexistent/corpus"),
        (
            [
                "--join",
                "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWFkJQuGvmedvQYJeG2j5h23QAyTydWcx5txxJddkQXx97",
                "--set",
                "peers.bootstrap_attempts=1",
            ],
            1,
            "/ip4/127.0.0.1/tcp/9/p2p/",
        ),
        (["--join", "127.0.0.1:9"], 2, "is not a multiaddr"),
    ],
)
def test_user_errors_are_clear_and_without_traceback(
    args: list[str], code: int, message: str
) -> None:
    done = _run(*args)
    assert done.returncode == code, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_status_health_and_metrics_of_a_running_node(nodes: Nodes) -> None:
    import json
    import urllib.request

    node = nodes.start()
    info = node.info()
    node.wait_for(r"round 2: ")
    status = subprocess.run(
        [sys.executable, "-m", "locoswarm", "status", str(info["grpc"]), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    reported = json.loads(status.stdout)
    assert reported["peer_id"] == info["peer_id"]
    assert reported["outer_step"] >= 2
    assert reported["strategy"] == "noloco"
    health = subprocess.run(
        [sys.executable, "-m", "locoswarm", "health", str(info["grpc"])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (health.returncode, health.stdout.strip()) == (0, "SERVING")
    with urllib.request.urlopen(str(info["metrics"]), timeout=10) as reply:
        text = reply.read().decode()
    for name in (
        "locoswarm_protocol_sent_bytes_total",
        "locoswarm_trainer_idle_seconds_total",
        "locoswarm_trainer_compute_seconds_total",
        "locoswarm_sync_exchange_seconds_bucket",
        'locoswarm_sync_exchanges_total{result="solo"}',
        "locoswarm_sync_outer_step",
        'locoswarm_protocol_rejected_total{reason="bad_checksum"}',
        "locoswarm_trainer_loss",
        "locoswarm_peers_live",
        "locoswarm_trainer_tokens_total",
    ):
        assert name in text, name
    assert node.stop() == 0
    gone = subprocess.run(
        [sys.executable, "-m", "locoswarm", "health", str(info["grpc"]), "--timeout", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert gone.returncode == 1


def test_demo_starts_a_local_swarm_that_exchanges(tmp_path: Path) -> None:
    before = procs.named("p2pd", below=os.getpid())  # orphans come to us: tests/conftest.py
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "locoswarm",
            "demo",
            "--nodes",
            "2",
            "--rounds",
            "10",
            "--inner-steps",
            "20",
            "--dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=200,
        start_new_session=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "metrics http://127.0.0.1:" in done.stdout
    assert re.search(r"node\d round \d+: exchanged", done.stdout), done.stdout
    assert procs.wait_gone(procs.named("p2pd", below=os.getpid()) - before) == set()


def test_a_diloco_group_of_three_ends_each_round_with_identical_weights(nodes: Nodes) -> None:
    args = ["--sync", "diloco", "--group-size", "3", "--bits", "32", "--rounds", "20"]
    first = nodes.start(*args)
    join = nodes.join_address(first)
    first.wait_for(r"round 1: ")
    others = [nodes.start(*args, "--join", join) for _ in range(2)]
    for node in [first, *others]:
        assert node.proc.wait(timeout=200) == 0, node.text()
    # Each member labels a round with its own number, and partners may be a round apart (the lag
    # window, 2): a member's exchanged round must have the same phi as an exchanged round of
    # each partner within that window. (The event's partner_rounds are not used: for groups they
    # can name our own round instead of the partner's; see the issue 13 note.)
    events = [e for node in [first, *others] for e in round_events(node.text())]
    threes = [e for e in events if e["outcome"] == "exchanged" and len(e["partners"]) == 2]
    assert len(threes) >= 3, events
    # Rounds where all three averaged in one group: the late joiners fetched phi and momentum,
    # so the three slow weights stay bit-identical.
    compared = 0
    for e in threes:
        for partner in e["partners"]:
            theirs = {
                t["phi"]
                for t in events
                if t["peer"] == partner
                and abs(t["round"] - e["round"]) <= 2
                and t["outcome"] == "exchanged"  # else its side of the exchange failed
                and e["peer"] in t["partners"]
            }
            if theirs:
                assert e["phi"] in theirs, (e, partner)
                compared += 1
    assert compared >= 6, threes


def test_the_reachability_self_test_says_who_can_be_dialled(nodes: Nodes) -> None:
    """A joiner asks the peer it joined through to dial its gRPC address: reached when it
    announces its real address; not reached, with what to do, when it announces a dead port."""
    first = nodes.start()
    join = nodes.join_address(first)
    good = nodes.start("--join", join)
    dead = nodes.start("--join", join, "--announce", "127.0.0.1:1")
    good.wait_for(r"reachability: \S+ reached our gRPC address 127\.0\.0\.1:\d+ directly")
    found = dead.wait_for(r"reachability: \S+ could not reach 127\.0\.0\.1:1 \((.*)\); (.*)")
    assert "unreachable" in found.group(1)
    assert "forward TCP port 1" in found.group(2)
    assert "--client-mode" in found.group(2)
    first.wait_for(r"reachability: no peer to ask yet")
    for node, want in ((good, True), (dead, False)):
        deadline = time.monotonic() + 30
        while node.info().get("reachable") is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert node.info()["reachable"] is want
