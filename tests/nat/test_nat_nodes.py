"""Two locoswarm nodes, each behind its own masquerading router (network namespaces this test
makes, see netns.py), exchange with each other: neither can be dialled, so they pair over the
DHT's libp2p daemon, relayed through the public bootstrap node and then hole-punched."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from locoswarm.sim.replay import round_events
from tests.integration.conftest import QUICK, Node
from tests.nat.netns import NatTopology, netns_available

pytestmark = [pytest.mark.integration]

ROUNDS = 8


@pytest.fixture
def topo(request: pytest.FixtureRequest) -> Iterator[NatTopology]:
    reason = netns_available()
    if reason is not None:
        pytest.skip(
            f"no network namespaces here ({reason}); tests/integration/test_paths.py runs the "
            "same pairing with listen-less nodes on loopback"
        )
    topology = NatTopology(n_public_peers=getattr(request, "param", 4))
    try:
        topology.setup()
        yield topology
    finally:
        topology.teardown()


def _start(topo: NatTopology, ns: str, name: str, root: Path, *args: str) -> Node:
    log, ready = root / f"{name}.log", root / f"{name}.json"
    argv = [sys.executable, "-m", "locoswarm", "run", *QUICK, "--ready-file", str(ready), *args]
    with open(log, "ab") as out:
        proc = topo.popen(ns, argv, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=out)
    return Node(name, proc, log, ready)


def _nated_pair(topo: NatTopology, root: Path, *args: str) -> tuple[list[Node], list[set[str]]]:
    """A public bootstrap node and two NATed client-mode nodes; returns the two, once they
    finished, and the paths each one's exchanges took (they exchanged with each other only)."""
    # The public node trains another run: it is nobody's partner, only the DHT's entry and the
    # relay. The bare public p2pd peers let the NATed nodes learn their outside address.
    boot = _start(
        topo, topo.public_ns, "boot", root,
        "--host", topo.public_ip, "--dht-port", "31337", "--run-id", "bootstrap-only",
    )  # fmt: skip
    public = topo.start_public_peers(root)
    maddrs = boot.info()["maddrs"]
    assert isinstance(maddrs, list)
    join = [str(m) for m in maddrs if f"/{topo.public_ip}/" in str(m)]
    assert join, maddrs
    flags = ["--host", "0.0.0.0", "--client-mode", "--rounds", str(ROUNDS), *args]
    for maddr in (join[0], *public):
        flags += ["--join", maddr]
    pair = [
        _start(topo, topo.nat_a_ns, "a", root, *flags),
        _start(topo, topo.nat_b_ns, "b", root, *flags),
    ]
    for node in pair:
        try:
            assert node.proc.wait(timeout=240) == 0, node.text()
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{node.name} did not finish:\n{node.text()[-6000:]}") from None
    ids = [str(n.info()["peer_id"]) for n in pair]
    paths = []
    for node, other in zip(pair, reversed(ids), strict=True):
        assert "could not reach" not in node.text()
        exchanged = [e for e in round_events(node.text()) if e["outcome"] == "exchanged"]
        assert len(exchanged) >= 2, node.text()[-6000:]
        assert {p for e in exchanged for p in e["partners"]} == {other}
        paths.append({str(e["path"]) for e in exchanged})
        losses = [float(e["loss"]) for e in round_events(node.text())]
        assert min(losses[-3:]) < losses[0], losses  # and they learn
    boot.stop()
    return pair, paths


@pytest.mark.timeout(300)
def test_two_nated_nodes_exchange_hole_punched(topo: NatTopology, tmp_path: Path) -> None:
    """Full-size (fp32) messages: over the relay's budget, so they wait for the direct
    connection that hole punching makes (4 public peers tell the NATed nodes their outside
    address)."""
    _, paths = _nated_pair(topo, tmp_path)
    assert set().union(*paths) == {"libp2p"}, paths


@pytest.mark.parametrize("topo", [0], indirect=True)
@pytest.mark.timeout(300)
def test_two_nated_nodes_exchange_compressed_messages_through_the_relay(
    topo: NatTopology, tmp_path: Path
) -> None:
    """Without public peers to learn their outside address from, hole punching never starts:
    the nodes exchange through the relay, with messages compressed under its budget (ef: 4-bit
    proposals of half the blocks each round, about 80 KB)."""
    _, paths = _nated_pair(topo, tmp_path, "--sync", "ef", "--set", "sync.rotate=2")
    assert set().union(*paths) == {"relayed"}, paths
