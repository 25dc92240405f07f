"""Reachability probes: what a probe may name, and how often a peer may ask."""

from __future__ import annotations

import pytest

from locoswarm.peers.reach import REACHED, ProbeService, check_address, peer_of


@pytest.mark.parametrize(
    ("address", "ok"),
    [
        ("127.0.0.1:50051", True),
        ("node.example.org:443", True),
        ("[::1]:50051", True),
        ("127.0.0.1", False),
        ("127.0.0.1:0", False),
        ("127.0.0.1:70000", False),
        ("http://x:1", False),
        ("a b:1", False),
        ("x" * 300 + ":1", False),
    ],
)
def test_a_probe_names_a_host_and_port_only(address: str, ok: bool) -> None:
    assert (check_address(address) is None) is ok


def test_the_peer_id_of_a_join_address() -> None:
    assert peer_of("/ip4/1.2.3.4/tcp/5/p2p/QmPeer") == "QmPeer"
    assert peer_of("/ip4/1.2.3.4/tcp/5") is None


async def test_probes_are_dialled_limited_per_asker_and_refused_when_malformed() -> None:
    dialled: list[str] = []
    now = [0.0]

    async def dial(address: str) -> str | None:
        dialled.append(address)
        return None if address.endswith(":1000") else "UNAVAILABLE: refused"

    service = ProbeService(dial, min_interval_s=30.0, clock=lambda: now[0])
    assert await service.probe("a", "127.0.0.1:1000") == REACHED
    assert (await service.probe("a", "127.0.0.1:1000")).startswith("refused: one probe per 30s")
    assert await service.probe("b", "127.0.0.1:2000") == "unreachable: UNAVAILABLE: refused"
    assert (await service.probe("c", "not an address")).startswith("refused: not a HOST:PORT")
    now[0] = 31.0
    assert await service.probe("a", "127.0.0.1:1000") == REACHED
    assert dialled == ["127.0.0.1:1000", "127.0.0.1:2000", "127.0.0.1:1000"]
