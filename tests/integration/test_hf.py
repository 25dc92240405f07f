"""``--task hf`` in a live swarm: three nodes train a tiny Llama on jsonl files, one restarts from
its checkpoint and continues its data stream, and ``locoswarm export`` writes a folder that
``AutoModelForCausalLM.from_pretrained`` loads with the merged model's validation loss."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from locoswarm.node import checkpoint
from tests.hf_fixtures import HfFiles, make_hf_files
from tests.integration.conftest import QUICK, Node, Nodes

pytest.importorskip("transformers", reason="--task hf needs the [hf] extra")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

BATCH = 4


def _task_flags(files: HfFiles) -> list[str]:
    return [
        *files.task_flags(),
        *("--batch-size", str(BATCH), "--seq-len", "64", "--val-batches", "2"),
        *("--set", "task.val_fraction=0.1", "--set", "task.shuffle_windows=32"),
        *("--inner-steps", "10", "--warmup-steps", "5", "--lr", "3e-3", "--eval-every", "1"),
    ]


def _wait_exchanges(node: Node, count: int, timeout_s: float = 120) -> None:
    """Until ``node`` has exchanged with a partner in ``count`` rounds (a late joiner starts at
    the swarm's round, so no round number is certain to appear in its log)."""
    deadline = time.monotonic() + timeout_s
    while sum(outcome == "exchanged" for _, outcome, _ in node.rounds()) < count:
        if time.monotonic() > deadline or node.proc.poll() is not None:
            raise AssertionError(f"{node.name}: fewer than {count} exchanges:\n{node.text()}")
        time.sleep(0.2)


def _val_losses(node: Node) -> list[float]:
    events = [json.loads(m) for m in re.findall(r"round-event (\{.*\})", node.text())]
    return [float(e["val_loss"]) for e in events if e.get("val_loss") is not None]


def _data_offset(state: dict[str, Any]) -> int:
    """Windows the stream packed less BATCH per inner step: the buffer's fill, less BATCH per
    step a late join's jump of the step count added. Constant while a node draws one batch per
    step."""
    return int(state["trainer"]["data"]["windows"]) - BATCH * int(state["trainer"]["step"])


def _export(files: HfFiles, tmp_path: Path, *sources: str) -> dict[str, Any]:
    out = tmp_path / "merged.safetensors"
    cmd = [sys.executable, "-m", "locoswarm", "export", *QUICK, *_task_flags(files)]
    cmd += [*sources, "--out", str(out), "--hf-dir", str(tmp_path / "merged")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr + done.stdout
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert isinstance(report, dict)
    return report


def test_hf_swarm_trains_resumes_and_exports(nodes: Nodes, tmp_path: Path) -> None:
    files = make_hf_files(tmp_path / "hf")
    flags = _task_flags(files)
    dirs = [tmp_path / f"ckpt{i}" for i in range(3)]
    first = nodes.start(*flags, "--checkpoint-dir", str(dirs[0]), "--checkpoint-every", "1")
    join = nodes.join_address(first)
    trio = [first] + [
        nodes.start(*flags, "--join", join, "--checkpoint-dir", str(d), "--checkpoint-every", "1")
        for d in dirs[1:]
    ]
    for node in trio:
        _wait_exchanges(node, 3)
    losses = _val_losses(first)
    assert losses[-1] < losses[0] - 0.2, losses

    # Stopped and started again, a node continues its round and its data stream.
    assert trio[2].stop(signal.SIGTERM) == 0
    found = checkpoint.load_latest(dirs[2])
    assert found is not None
    saved_round, saved = int(found[1]["outer_step"]), found[1]
    # The swarm runs rounds faster than a node starts: a wide lag window keeps the restarted node
    # on its own checkpoint (else it would fetch the swarm's state and jump its step count).
    again = nodes.start(
        *flags,
        *("--join", join, "--checkpoint-dir", str(dirs[2]), "--checkpoint-every", "1"),
        *("--set", "peers.lag_window=1000000"),
    )
    resumed = again.wait_for(r"resumed from \S+ at round (\d+), step (\d+)", timeout_s=90)
    assert int(resumed.group(1)) == saved_round
    assert int(resumed.group(2)) == int(saved["trainer"]["step"])
    _wait_exchanges(again, 2)
    again.wait_for(r"checkpoint \S+ at round \d+", timeout_s=60)  # one after the restart
    assert "late join" not in again.text()
    latest = checkpoint.load_latest(dirs[2])
    assert latest is not None
    assert int(latest[1]["trainer"]["step"]) > int(saved["trainer"]["step"])
    # The stream went on from the saved position (one batch per step); a stream started over
    # would have packed fewer windows for the same step count.
    assert _data_offset(latest[1]) == _data_offset(saved)

    # Export from the live nodes: a save_pretrained folder with the merged model's loss.
    from transformers import AutoModelForCausalLM

    from locoswarm.tasks.task import TaskConfig, TaskFactory

    live = [f"--from-peer=127.0.0.1:{n.info()['grpc_port']}" for n in (first, trio[1], again)]
    report = _export(files, tmp_path, *live)
    assert len(report["sources"]) == 3
    # One merge of the replicas is no worse than the mean replica (the acceptance point).
    own = [float(s["val_loss"]) for s in report["sources"].values()]
    assert float(report["val_loss"]) <= sum(own) / len(own) + 1e-6, report
    model = AutoModelForCausalLM.from_pretrained(report["hf_dir"])
    cfg = TaskConfig(
        name="hf",
        model=str(files.model),
        data=(str(files.data),),
        batch_size=BATCH,
        seq_len=64,
        val_batches=2,
        val_fraction=0.1,
    )
    task = TaskFactory(cfg).build(replica=0, num_replicas=1, seed=0)
    assert task.validation_loss(model) == pytest.approx(float(report["val_loss"]), rel=1e-5)
    assert float(report["val_loss"]) < losses[0]
    for node in (first, trio[1], again):
        assert node.stop() == 0
