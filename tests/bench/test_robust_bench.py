"""The bad-peer benchmark end to end on a very short run: every entry, the checks, the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.robust import main
from locoswarm.sync.robust import ATTACKS


@pytest.mark.timeout(300)  # 8 simulator runs: about 30 s alone, several times that under load
def test_a_short_run_writes_every_attack_with_and_without_clipping(tmp_path: Path) -> None:
    out = tmp_path / "robust.json"
    args = ["--modes", "noloco", "--rounds", "2", "--inner-steps", "2", "--json", str(out)]
    assert main(args) == 0
    data = json.loads(out.read_text())
    runs = data["runs"]
    assert [(r["attack"], r["clip"]) for r in runs] == [
        (None, True),
        (None, False),
        *((attack, clip) for attack in ATTACKS for clip in (True, False)),
    ]
    for run in runs:
        assert len(run["honest_val_loss"]) == 3
        assert len(run["clipped_per_replica"]) == 4
    assert all(r["clipped_per_replica"] == [0, 0, 0, 0] for r in runs if not r["clip"])
    assert set(data["checks"]) == {
        f"noloco {a}: every honest replica within 5% of clean" for a in ATTACKS
    }
    assert out.with_suffix(".png").stat().st_size > 0
