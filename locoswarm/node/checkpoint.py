"""Atomic checkpoints: write to a temporary file, fsync, rename; load the newest good one.

Loading uses ``torch.load(weights_only=True)``; a checkpoint that fails to load is reported and
the previous one is used.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import torch

from locoswarm.errors import CheckpointError
from locoswarm.faultplan import NO_FAULTS, FaultPlan

log = logging.getLogger(__name__)
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
