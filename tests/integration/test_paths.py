"""The libp2p path on loopback: nodes that cannot be dialled (client mode, no gRPC server) pair
with each other over streams of the DHT's libp2p daemon. The NAT test (tests/nat) runs the same
behind masquerading routers where the machine allows network namespaces."""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path

import pytest

from locoswarm.sim.replay import round_events
from tests.faults.test_faults import metric
from tests.integration.conftest import Nodes

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def test_two_client_mode_nodes_exchange_over_libp2p(nodes: Nodes, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("a-swarm-secret-of-some-length\n")
    # The bootstrap node trains another run: it is nobody's partner, only the DHT's entry.
    boot = nodes.start("--run-id", "bootstrap-only", "--secret-file", str(secret))
    join = nodes.join_address(boot)
    flags = ["--client-mode", "--join", join, "--rounds", "14", "--secret-file", str(secret)]
    first = nodes.start(*flags, name="client0")
    first.wait_for(r"round 1: ")
    # The second joins a running swarm whose only node has no address: it fetches the state over
    # libp2p too.
    pair = [first, nodes.start(*flags, name="client1")]
    seen = 0.0
    deadline = time.monotonic() + 180
    while any(n.proc.poll() is None for n in pair) and time.monotonic() < deadline:
        for node in pair:
            with contextlib.suppress(OSError, KeyError):  # not ready yet, or just finished
                seen = max(
                    seen, metric(node, "locoswarm_sync_exchange_paths_total", 'path="libp2p"')
                )
        time.sleep(0.5)
    for node in pair:
        assert node.proc.wait(timeout=60) == 0, node.text()
    ids = [str(n.info()["peer_id"]) for n in pair]
    for node, other in zip(pair, reversed(ids), strict=True):
        assert "grpc_port" not in node.info()  # no server: it cannot be dialled
        exchanged = [e for e in round_events(node.text()) if e["outcome"] == "exchanged"]
        assert len(exchanged) >= 3, node.text()
        assert {e["path"] for e in exchanged} == {"libp2p"}
        assert {p for e in exchanged for p in e["partners"]} == {other}
        assert "exchanged over libp2p" in node.text()
    assert seen >= 1
    late = r"late join: fetched the outer weights of round [1-9]\d* from " + ids[0]
    assert re.search(late, pair[1].text()), pair[1].text()
    assert boot.stop() == 0


def test_a_diloco_group_of_three_client_mode_nodes_averages_over_libp2p(nodes: Nodes) -> None:
    """Groups too: nobody has an address, the lowest id leads, every shard travels over libp2p,
    and the three leave each round with the same outer weights."""
    boot = nodes.start("--run-id", "bootstrap-only")
    join = nodes.join_address(boot)
    flags = ["--client-mode", "--join", join, "--rounds", "10", "--sync", "diloco"]
    flags += ["--bits", "32", "--set", "sync.group_size=3", "--set", "peers.min_peers=2"]
    trio = [nodes.start(*flags, name=f"member{i}") for i in range(3)]
    for node in trio:
        assert node.proc.wait(timeout=200) == 0, node.text()
    phis: dict[int, list[str]] = {}
    for node in trio:
        exchanged = [e for e in round_events(node.text()) if e["outcome"] == "exchanged"]
        assert len(exchanged) >= 3, node.text()
        assert {e["path"] for e in exchanged} == {"libp2p"}
        # Two may pair while the third is still starting (peers.min_peers=2); it then fetches
        # their state as a late joiner. Rounds of all three are what is compared.
        assert {len(e["partners"]) for e in exchanged} <= {1, 2}, exchanged
        for e in exchanged:
            if len(e["partners"]) == 2:
                phis.setdefault(int(e["round"]), []).append(str(e["phi"]))
    assert sum(len(ids) == 3 for ids in phis.values()) >= 3, phis  # rounds all three averaged
    for ids in phis.values():
        assert len(set(ids)) == 1, phis  # and left with the same outer weights
    assert boot.stop() == 0
