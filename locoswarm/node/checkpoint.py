"""Atomic checkpoints: write to a temporary file, fsync, rename; load the newest good one.

Loading uses ``torch.load(weights_only=True)``; a checkpoint that fails to load is reported and
the previous one is used.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import torch

from locoswarm.errors import CheckpointError, ConfigError
from locoswarm.faultplan import NO_FAULTS, FaultPlan
from locoswarm.node.config import NodeConfig
from locoswarm.node.outer import OuterStep
from locoswarm.node.trainer import Trainer
from locoswarm.settings import to_dict
from locoswarm.tasks.inner import weights_digest

log = logging.getLogger("locoswarm.node")
PREFIX = "round-"
SUFFIX = ".pt"


def path_for(directory: Path, outer_step: int) -> Path:
    return directory / f"{PREFIX}{outer_step:09d}{SUFFIX}"


def save(
    directory: Path,
    outer_step: int,
    state: dict[str, Any],
    *,
    keep: int,
    faults: FaultPlan = NO_FAULTS,
) -> Path:
    """Write ``state`` as the checkpoint of ``outer_step`` atomically; prune to ``keep``."""
    directory.mkdir(parents=True, exist_ok=True)
    final = path_for(directory, outer_step)
    tmp = final.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        torch.save(state, out)
        out.flush()
        os.fsync(out.fileno())
    if faults.fire("checkpoint", outer_step=outer_step) is not None:
        os.kill(os.getpid(), signal.SIGKILL)  # test seam: die between write and rename
    os.replace(tmp, final)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself is durable
    finally:
        os.close(fd)
    for old in sorted(directory.glob(f"{PREFIX}*{SUFFIX}"))[:-keep]:
        old.unlink(missing_ok=True)
    return final


def load_latest(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads, or None when there is none at all."""
    if not directory.is_dir():
        return None
    errors = []
    for path in sorted(directory.glob(f"{PREFIX}*{SUFFIX}"), reverse=True):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file: try the previous one
            log.error("checkpoint %s is unreadable (%s); trying the previous one", path, exc)
            errors.append(f"{path.name}: {exc}")
            continue
        if not isinstance(state, dict) or "outer_step" not in state:
            errors.append(f"{path.name}: not a locoswarm checkpoint")
            continue
        return path, state
    if errors:
        raise CheckpointError(f"no loadable checkpoint in {directory}: {'; '.join(errors)}")
    return None


# -- a node's checkpoint: the trainer's state and the outer state of one round -------------------


def save_node(
    config: NodeConfig,
    outer_step: int,
    trainer_state: dict[str, Any],
    outer: OuterStep,
    *,
    faults: FaultPlan = NO_FAULTS,
) -> None:
    """Write the node's checkpoint of ``outer_step`` (whole-model work: off the event loop)."""
    directory = config.checkpoint.dir
    if directory is None:
        return
    with outer.reading():  # a round finishing meanwhile leaves this state's memory alone
        outer_state = outer.state_dict()  # one round's state, read once
        state = {
            "outer_step": outer_step,
            "trainer": trainer_state,
            "outer": outer_state,
            "fingerprint": outer.fingerprint,
            "config": json.dumps(to_dict(config)),
        }
        path = save(Path(directory), outer_step, state, keep=config.checkpoint.keep, faults=faults)
        phi = weights_digest(outer_state["state"]["phi"])
    log.info(
        "checkpoint %s at round %d, step %d: weights %s, phi %s",
        path,
        outer_step,
        trainer_state["step"],
        weights_digest(trainer_state["model"].values()),  # one tensor at a time: no copy
        phi,
    )


def restore_node(config: NodeConfig, trainer: Trainer, outer: OuterStep) -> int | None:
    """Load the newest checkpoint into ``trainer`` and ``outer``; returns its round (None: no
    checkpoint). Raises ConfigError for a checkpoint of another model."""
    directory = config.checkpoint.dir
    found = None if directory is None else load_latest(Path(directory))
    if found is None:
        return None
    path, state = found
    if state.get("fingerprint") != outer.fingerprint:
        raise ConfigError(
            f"checkpoint {path} is for model fingerprint {state.get('fingerprint')}, this "
            f"configuration has {outer.fingerprint}: use another --checkpoint-dir"
        )
    trainer.load_state_dict(state["trainer"])
    outer.load_state_dict(state["outer"])
    outer_step = int(state["outer_step"])
    log.info(
        "resumed from %s at round %d, step %d: weights %s, phi %s",
        path,
        outer_step,
        trainer.step,
        weights_digest(trainer.model.parameters()),
        weights_digest(outer.phi),
    )
    return outer_step
