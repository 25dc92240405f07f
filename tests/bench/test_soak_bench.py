"""The soak benchmark end to end, short: three real daemons, kills and restarts, the report's
figures and checks, the plot, and no process left behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench.soak import main
from locoswarm.node import processes as procs


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(180)
def test_short_soak_kills_restarts_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    children_before = procs.descendants(os.getpid())
    argv = ["--minutes", "0.5", "--nodes", "3", "--kill-every-s", "10", "--sample-every-s", "3"]
    assert main([*argv, "--json", str(out), "--log-dir", str(tmp_path / "logs")]) == 0
    data = json.loads(out.read_text())

    assert data["error"] is None
    assert data["interrupted"] is False
    header = data["header"]
    assert header["nodes"] == 3
    assert header["kill_every_s"] == 10
    assert header["cpu_count"] > 0
    for dist in ("python", "torch", "hivemind", "grpcio"):
        assert header["versions"][dist], dist

    summary = data["summary"]
    assert summary["kills"] >= 1
    assert summary["kills"] == len(data["kills"])
    assert summary["rounds"] > 0
    assert summary["rounds"] == sum(summary["exchanges"].values())
    assert summary["exchanges"]["ok"] > 0  # the swarm exchanged at all
    assert 0.0 <= summary["ok_fraction"] <= 1.0
    assert len(summary["loss_quarters"]) == 4
    assert any(q is not None for q in summary["loss_quarters"])

    assert [n["name"] for n in data["nodes"]] == ["node0", "node1", "node2"]
    pids: set[int] = set()
    for node in data["nodes"]:
        incs = node["incarnations"]
        assert node["restarts"] == len(incs) - 1
        assert set(node["exchanges_log"]) >= {"ok", "failed", "solo"}
        assert all(v >= 0 for v in node["exchanges_log"].values())
        for key, value in node["exchanges_log"].items():
            assert value == sum(i["exchanges_log"].get(key, 0) for i in incs)
        for inc in incs:
            pids.add(inc["pid"])
            assert inc["end"] in ("killed", "stopped", "exited", "cleanup")
            if inc["end"] == "killed":  # only nodes that were ready get killed
                assert inc["ready_t"] is not None, (node["name"], inc["incarnation"])
            assert inc["samples"], (node["name"], inc["incarnation"])
            for _t, rss, fds, group_rss, group_fds in inc["samples"]:
                assert rss is None or rss > 0
                assert fds is None or fds > 0
                assert group_rss >= (rss or 0)
                assert group_fds >= (fds or 0)
            for _t, _round, result, loss in inc["rounds"]:
                assert result in ("ok", "failed", "solo")
                assert loss is None or loss > 0
            growth = inc["rss_bytes"]["growth"]
            assert growth is None or growth > -1
        # earlier incarnations all ended by SIGKILL; a restart comes after its kill
        assert all(i["end"] == "killed" and i["exit_code"] == -9 for i in incs[:-1])

    for kill in data["kills"]:
        assert kill["restarted_t"] >= kill["killed_t"]
        assert kill["restarted_incarnation"] == kill["killed_incarnation"] + 1
        assert kill["joined_through"] != kill["slot"]
        rounds = kill["rounds_to_first_exchange"]
        assert rounds is None or rounds >= 1
        if kill["determined"]:
            assert kill["within_target"] == (rounds is not None and rounds <= 2)
        restarted = data["nodes"][kill["slot"]]["incarnations"][kill["restarted_incarnation"]]
        # From its checkpoint, or (none written yet) from a live peer; both only when the swarm
        # moved more than the lag window (2) past its checkpoint while it was down.
        resumed, joined = restarted["resumed_round"], restarted["late_join_round"]
        assert resumed is None or joined is None or joined > resumed + 2

    checks = data["checks"]
    assert len(checks) == 4
    assert all(ok in (True, False, None) for ok in checks.values())
    assert checks["no leftover processes"] is True, data["leftover"]
    assert data["leftover"]["leftover_after_cleanup"] == []
    assert data["leftover"]["after_graceful_stop"] == []
    assert data["leftover"]["p2pd_seen"] >= 3
    assert data["leftover"]["p2pd_new_still_running_ours"] == []

    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # nothing left behind, checked independently of the report
    assert procs.wait_gone(pids) == set()
    for pid in pids:
        assert procs.wait_gone(procs.in_group(pid)) == set(), pid
    assert procs.descendants(os.getpid()) - children_before == set()
