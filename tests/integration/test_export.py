"""``locoswarm export``: one merged model file from live nodes (FetchState) and from their
checkpoint folders; it loads back into the task's model with the same validation loss."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_model

from locoswarm.node.cli import build_parser
from locoswarm.node.run import config_from_args
from tests.integration.conftest import QUICK, Nodes

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _export(tmp_path: Path, name: str, *sources: str) -> dict[str, Any]:
    out = tmp_path / f"{name}.safetensors"
    cmd = [sys.executable, "-m", "locoswarm", "export", *QUICK, *sources, "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr + done.stdout
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert out.exists()
    assert isinstance(report, dict)
    return report


def test_export_merges_live_nodes_and_checkpoints(nodes: Nodes, tmp_path: Path) -> None:
    dirs = [tmp_path / f"ckpt{i}" for i in range(3)]
    first = nodes.start("--checkpoint-dir", str(dirs[0]), "--checkpoint-every", "2")
    join = nodes.join_address(first)
    trio = [first] + [
        nodes.start("--join", join, "--checkpoint-dir", str(d), "--checkpoint-every", "2")
        for d in dirs[1:]
    ]
    for node in trio:
        # Round 4 or later, and a checkpoint: a node that joined late (its first round past 4,
        # when the first trained fast) never logs round 4.
        node.wait_for(r"round (?:[4-9]|[1-9]\d+): (?:exchanged|solo)", timeout_s=150)
        node.wait_for(r"checkpoint \S+ at round \d+", timeout_s=150)
    live = [f"--from-peer=127.0.0.1:{n.info()['grpc_port']}" for n in trio]
    report = _export(tmp_path, "live", *live)
    sources = report["sources"]
    assert len(sources) == 3
    losses = [float(s["val_loss"]) for s in sources.values()]
    # One merge of replicas that train together: no worse than their mean (issue 16).
    assert float(report["val_loss"]) <= sum(losses) / 3 + 1e-6, report

    # It loads back into the task's model, with the same validation loss.
    args = build_parser().parse_args(["export", *QUICK, "--out", "x"])
    from locoswarm.node.export import build_model

    task, fp = build_model(config_from_args(args))
    assert fp == report["fingerprint"]
    load_model(task.model, str(tmp_path / "live.safetensors"))
    assert task.validation_loss(task.model) == pytest.approx(float(report["val_loss"]), rel=1e-5)

    for node in trio:
        assert node.stop() == 0
    saved = _export(tmp_path, "saved", *(f"--from-checkpoint={d}" for d in dirs))
    assert len(saved["sources"]) == 3
    assert all("round-" in name for name in saved["sources"])
    assert torch.isfinite(torch.tensor(float(saved["val_loss"])))


def test_export_says_what_is_missing(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "locoswarm", "export", *QUICK, "--out", str(tmp_path / "m")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert "--from-peer" in done.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    cmd += ["--from-checkpoint", str(empty)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    assert f"no checkpoint in {empty}" in done.stderr
