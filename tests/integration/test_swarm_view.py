"""A swarm one can see into: a node with the wrong secret says so, the others stop picking it,
and ``locoswarm swarm`` lists every node with its round and losses."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from locoswarm.node import processes as procs
from locoswarm.sim.replay import round_events
from tests.integration.conftest import Node, Nodes

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def _cli(*args: str, timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
    """``python -m locoswarm ARGS`` in its own session; its process group is killed after."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "locoswarm", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    finally:
        group = procs.in_group(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert procs.wait_gone(group) == set()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _partners(node: Node) -> list[str]:
    return [p for e in round_events(node.text()) for p in e["partners"]]


def _exchanged(node: Node) -> int:
    return sum(1 for _, how, _ in node.rounds() if how == "exchanged")


def metric(node: Node, line: str) -> bool:
    with urllib.request.urlopen(str(node.info()["metrics"]), timeout=10) as reply:
        return line in reply.read().decode()


def _wait(what: str, check: object, timeout_s: float, details: object) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f}s\n{details()}")  # type: ignore[operator]
        time.sleep(0.5)


def test_a_node_with_another_secret_says_so_and_the_swarm_shows_every_node(
    nodes: Nodes, tmp_path: Path
) -> None:
    ours, theirs = tmp_path / "swarm.secret", tmp_path / "other.secret"
    ours.write_text("the-swarm-secret-0123456789")
    theirs.write_text("another-secret-9876543210")
    first = nodes.start("--secret-file", str(ours))
    join = nodes.join_address(first)
    honest = [first] + [nodes.start("--join", join, "--secret-file", str(ours)) for _ in range(2)]
    odd = nodes.start("--join", join, "--secret-file", str(theirs), name="odd")
    ids = {str(n.info()["peer_id"]): n for n in honest}
    odd_id = str(odd.info()["peer_id"])
    # The join line names what a joiner needs.
    assert f"--secret-file {ours}" in str(first.info()["join"])
    assert "with copies of these files" in first.text()

    # The odd one out says what is wrong and how to fix it, within its first rounds.
    warning = odd.wait_for(r"WARN\w* locoswarm.node: misconfiguration: (.*)", timeout_s=180)
    assert "--secret-file" in warning.group(1)
    assert "3 peers" in warning.group(1) or "2 peers" in warning.group(1)
    before = odd.text()[: warning.start()]
    assert len(round_events(before)) <= 3, before[-2000:]

    # The others exchange among themselves and never pick it.
    for node in honest:
        _wait(f"{node.name}: 3 exchanges", lambda n=node: _exchanged(n) >= 3, 240, node.text)
    for node in honest:
        partners = _partners(node)
        assert partners
        assert set(partners) <= set(ids), (node.name, partners)
    assert _exchanged(odd) == 0
    assert odd_id not in {p for n in honest for p in _partners(n)}

    # Nobody even dialled across the secrets: no node refused a call as unauthenticated.
    refused_line = 'locoswarm_protocol_rejected_total{reason="unauthenticated"} 0.0'
    for node in [*honest, odd]:
        assert metric(node, refused_line), node.name

    # Status: the odd node reports the problem; an honest one counts only its two peers.
    odd_address = str(odd.info()["grpc"])
    status = _cli("status", odd_address, "--secret-file", str(theirs), "--json")
    assert status.returncode == 0, status.stderr
    problems = json.loads(status.stdout)["problems"]
    assert len(problems) == 1
    assert "--secret-file" in problems[0]
    status = _cli("status", str(first.info()["grpc"]), "--secret-file", str(ours), "--json")
    assert json.loads(status.stdout)["num_peers"] == 2
    assert json.loads(status.stdout)["problems"] == []
    # A client without the secret is told its fix.
    refused = _cli("status", odd_address)
    assert refused.returncode == 1
    assert "add --secret-file PATH" in refused.stderr
    # Metrics: the odd node's gauge is 1 for the secret, the honest node excludes one peer.
    assert metric(odd, 'locoswarm_node_misconfigured{cause="secret"} 1.0')
    assert metric(first, 'locoswarm_peers_excluded{cause="secret"} 1.0')

    # The swarm view lists all four, with round and losses, and marks the odd one.
    swarm = _cli("swarm", "--join", join, "--secret-file", str(ours), "--json")
    assert swarm.returncode == 0, swarm.stderr
    rows = {r["peer_id"]: r for r in json.loads(swarm.stdout)}
    assert set(rows) == {*ids, odd_id}
    for peer, r in rows.items():
        assert r["round"] >= 1, r
        assert r["train_loss"] is not None, r
        assert r["val_loss"] is not None, r
        assert r["same_secret"] is (peer != odd_id)
    assert all(rows[p]["sent_bytes"] > 0 for p in ids)
    table = _cli("swarm", "--join", join, "--secret-file", str(ours), "--count", "1")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.strip().splitlines()
    assert lines[0].startswith("swarm locoswarm: 4 live peers")
    assert len(lines) == 6  # title, header, four peers
    assert sum("(another secret)" in line for line in lines) == 1
