"""The matching benchmark end to end on a small swarm: every scenario, the JSON and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.matching import SCENARIOS, main


@pytest.mark.slow
def test_small_run_writes_every_scenario_and_the_plot(tmp_path: Path) -> None:
    out = tmp_path / "matching.json"
    assert main(["--nodes", "32", "--rounds", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["header"]["nodes"] == 32
    assert data["header"]["deadline_s"] > 0
    assert [s["scenario"]["name"] for s in data["scenarios"]] == [s.name for s in SCENARIOS]
    for s in data["scenarios"]:
        (r,) = s["rounds"]
        assert r["no_double_booking"], r["problems"]
        assert 2 * r["pairs"] + r["solos"] == r["live_nodes"]
        assert s["summary"]["paired_share"] == 2 * r["pairs"] / r["live_nodes"]
    assert data["no_double_booking"] is True
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
