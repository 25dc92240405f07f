"""The peers benchmark end to end on 2 and 4 nodes: setup times, pairing rounds, records read and
DHT bytes, their growth with N, the plot, and no DHT process or p2pd left behind; and its parts
that read the kernel's TCP counters and fit the growth, on canned input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench.peers import fit_growth, main, parse_ss, traffic
from locoswarm.node import processes as procs

SS_SAMPLE = """\
0      0      127.0.0.1:32913      127.0.0.1:40581 users:(("p2pd",pid=11,fd=12))
\t bbr wscale:10,10 rto:208 bytes_sent:22166 bytes_acked:22167 bytes_received:18826 segs_out:131
0      0      127.0.0.1:40581      127.0.0.1:32913 users:(("p2pd",pid=12,fd=13))
\t bbr wscale:10,10 rto:204 bytes_sent:18826 bytes_acked:18826 bytes_received:22166 segs_out:135
0      0      127.0.0.1:5000      127.0.0.1:5001 users:(("python",pid=99,fd=3))
\t bbr wscale:10,10 rto:204 bytes_sent:7 bytes_acked:7 bytes_received:9
0      0      127.0.0.1:41875      127.0.0.1:40581 users:(("p2pd",pid=11,fd=14))
\t bbr wscale:10,10 rto:204 segs_out:1
"""


def test_ss_output_is_read_per_connection_of_the_given_pids() -> None:
    found = parse_ss(SS_SAMPLE, {11, 12})
    assert found == {
        ("127.0.0.1:32913", "127.0.0.1:40581"): (11, 22166, 18826),
        ("127.0.0.1:40581", "127.0.0.1:32913"): (12, 18826, 22166),
        ("127.0.0.1:41875", "127.0.0.1:40581"): (11, 0, 0),  # no data yet: no counters
    }


def test_traffic_counts_new_connections_whole_and_old_ones_by_difference() -> None:
    before = {("a", "b"): (11, 100, 50), ("c", "d"): (12, 10, 10)}
    after = {("a", "b"): (11, 150, 80), ("e", "f"): (12, 5, 7)}  # c-d closed, e-f opened
    assert traffic(before, after) == {
        11: {"sent": 50, "received": 30},
        12: {"sent": 5, "received": 7},
    }
    assert traffic(None, after) is None


def test_growth_fits_the_exponent_and_the_slope() -> None:
    fit = fit_growth([4, 8, 16], [16.0, 64.0, 256.0])
    assert fit["exponent"] == pytest.approx(2.0)
    assert fit_growth([4, 8], [4.0, 8.0])["per_extra_node"] == pytest.approx(1.0)
    assert fit_growth([4], [4.0])["exponent"] is None


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(120)
def test_two_sizes_discover_each_other_pair_without_double_booking_and_count_dht_bytes(
    tmp_path: Path,
) -> None:
    out = tmp_path / "peers.json"
    rc = main(["--nodes", "2", "4", "--rounds", "2", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["error"] is None, data["error"]
    assert rc == 0

    header = data["header"]
    assert header["sizes"] == [2, 4]
    assert header["rounds"] == 2
    assert header["cpu_count"] > 0
    for dist in ("hivemind", "grpcio", "python"):
        assert header["versions"][dist], dist
    assert header["date"]

    assert [run["nodes"] for run in data["runs"]] == [2, 4]
    dht_pids: list[int] = []
    p2pd_pids: list[int] = []
    for run in data["runs"]:
        n = run["nodes"]
        assert run["error"] is None
        assert run["join_s"] > 0
        assert len(run["join_per_node_s"]) == n
        assert run["discover_s"] > 0
        peers = set(run["peer_ids"])
        assert len(peers) == n
        assert set(run["discover_per_node_s"]) == peers
        assert all(run["p2pd_pids"]), run["p2pd_pids"]
        p2pd_pids += [pid for pid in run["p2pd_pids"] if isinstance(pid, int)]

        rounds = run["rounds"]
        assert [r["outer_step"] for r in rounds] == [0, 1]
        for r in rounds:
            assert r["pair_s"] > 0
            assert r["no_double_booking"] is True, r["problems"]
            assert r["pairs"] == r["responders"]
            assert 2 * r["pairs"] + r["solos"] == n, r["matches"]
            assert set(r["matches"]) == peers
            assert r["records_read"] == n * n  # every node reads every record
            if shutil.which("ss"):
                assert set(r["dht_bytes"]) == peers
                assert all(c["sent"] > 0 and c["received"] > 0 for c in r["dht_bytes"].values())
        assert run["pair_s"]["median"] > 0
        assert len(run["pair_s"]["all"]) == 2
        assert run["pairs"]["all"] == [r["pairs"] for r in rounds]
        assert run["solos"]["all"] == [r["solos"] for r in rounds]
        assert sum(run["pairs"]["all"]) >= 1
        assert run["no_double_booking"] is True
        assert run["records_read_per_node_round"] == n
        if shutil.which("ss"):
            assert run["dht_bytes_per_node_round"]["mean"] > 0
        dht_pids += run["dht_pids"]

    growth = data["growth"]
    assert growth["records_read_per_node_round"]["exponent"] == pytest.approx(1.0)
    assert growth["records_read_per_round"]["exponent"] == pytest.approx(2.0)
    if shutil.which("ss"):
        assert growth["dht_bytes_per_node_round_mean"]["exponent"] > 0

    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert len(dht_pids) == 6
    assert procs.wait_gone(set(dht_pids)) == set()
    # Its own p2pd daemons are gone (others may run meanwhile: tests in parallel start p2pd too)
    assert len(p2pd_pids) == 6
    assert procs.wait_gone(set(p2pd_pids)) == set()
