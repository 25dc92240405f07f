"""Two locoswarm nodes, each behind its own masquerading router (network namespaces this test
makes, see netns.py), exchange with each other: neither can be dialled, so they pair over the
DHT's libp2p daemon, relayed through the public bootstrap node and then hole-punched."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from locoswarm.sim.replay import round_events
from tests.integration.conftest import QUICK, Node
from tests.nat.netns import NatTopology, netns_available

pytestmark = [pytest.mark.integration]

ROUNDS = 10


@pytest.fixture
def topo() -> Iterator[NatTopology]:
    reason = netns_available()
    if reason is not None:
        pytest.skip(
            f"no network namespaces here ({reason}); tests/integration/test_paths.py "
            "runs the same pairing with listen-less nodes on loopback"
        )
    topology = NatTopology(n_public_peers=4)
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


@pytest.mark.timeout(300)
def test_two_nated_nodes_exchange_with_each_other(topo: NatTopology, tmp_path: Path) -> None:
    # The public node trains another run: it is nobody's partner, only the DHT's entry and the
    # relay. The bare public p2pd peers let the NATed nodes learn their outside address.
    boot = _start(
        topo, topo.public_ns, "boot", tmp_path,
        "--host", topo.public_ip, "--dht-port", "31337", "--run-id", "bootstrap-only",
    )  # fmt: skip
    public = topo.start_public_peers(tmp_path)
    join = [str(m) for m in boot.info()["maddrs"] if f"/{topo.public_ip}/" in str(m)]  # type: ignore[attr-defined]
    assert join, boot.info()
    flags = ["--host", "0.0.0.0", "--client-mode", "--rounds", str(ROUNDS)]
    for maddr in (join[0], *public):
        flags += ["--join", maddr]
    pair = [
        _start(topo, topo.nat_a_ns, "a", tmp_path, *flags),
        _start(topo, topo.nat_b_ns, "b", tmp_path, *flags),
    ]
    for node in pair:
        try:
            assert node.proc.wait(timeout=240) == 0, node.text()
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{node.name} did not finish:\n{node.text()[-6000:]}") from None
    ids = [str(n.info()["peer_id"]) for n in pair]
    paths: set[str] = set()
    for node, other in zip(pair, reversed(ids), strict=True):
        exchanged = [e for e in round_events(node.text()) if e["outcome"] == "exchanged"]
        assert len(exchanged) >= 2, node.text()[-6000:]
        assert {p for e in exchanged for p in e["partners"]} == {other}
        paths |= {str(e["path"]) for e in exchanged}
    assert paths <= {"libp2p", "relayed"}, paths
    boot.stop()
    time.sleep(0)  # the topology's teardown kills whatever is left
