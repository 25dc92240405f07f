"""The peers benchmark end to end on 4 nodes: setup times, pairing rounds, the plot, and no DHT
process or p2pd left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.peers import main
from locoswarm.node import processes as procs


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(120)
def test_four_nodes_discover_each_other_and_pair_without_double_booking(tmp_path: Path) -> None:
    out = tmp_path / "peers.json"
    p2pd_before = procs.named("p2pd")
    rc = main(["--nodes", "4", "--rounds", "2", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["error"] is None, data["error"]
    assert rc == 0

    header = data["header"]
    assert header["nodes"] == 4
    assert header["rounds"] == 2
    assert header["cpu_count"] > 0
    for dist in ("hivemind", "grpcio", "python"):
        assert header["versions"][dist], dist
    assert header["date"]

    assert data["join_s"] > 0
    assert len(data["join_per_node_s"]) == 4
    assert data["discover_s"] > 0
    peers = set(data["peer_ids"])
    assert len(peers) == 4
    assert set(data["discover_per_node_s"]) == peers

    rounds = data["rounds"]
    assert [r["outer_step"] for r in rounds] == [0, 1]
    for r in rounds:
        assert r["pair_s"] > 0
        assert r["no_double_booking"] is True, r["problems"]
        assert r["pairs"] == r["responders"]
        assert 2 * r["pairs"] + r["solos"] == 4, r["matches"]
        assert set(r["matches"]) == peers
    assert data["pair_s"]["median"] > 0
    assert len(data["pair_s"]["all"]) == 2
    assert data["pairs"]["all"] == [r["pairs"] for r in rounds]
    assert data["solos"]["all"] == [r["solos"] for r in rounds]
    assert sum(data["pairs"]["all"]) >= 1
    assert data["no_double_booking"] is True

    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert len(data["dht_pids"]) == 4
    assert procs.wait_gone(set(data["dht_pids"])) == set()
    assert procs.wait_gone(procs.named("p2pd") - p2pd_before) == set()
