"""Process bookkeeping for tests that start DHTs, p2pd daemons or nodes: find and kill them."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(command name, parent pid, process group) of a live process, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie is dead; its parent just has not reaped it yet
        return None
    return name, int(fields[1]), int(fields[2])


def all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``."""
    parents: dict[int, list[int]] = {}
    for child in all_pids():
        info = _stat(child)
        if info is not None:
            parents.setdefault(info[1], []).append(child)
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def in_group(pgid: int) -> set[int]:
    """Live processes of process group ``pgid``."""
    return {p for p in all_pids() if (info := _stat(p)) is not None and info[2] == pgid}


def named(name: str) -> set[int]:
    """Live processes whose command name is ``name`` (e.g. ``p2pd``)."""
    return {p for p in all_pids() if (info := _stat(p)) is not None and info[0] == name}


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and everything below it."""
    for victim in [*descendants(pid), pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


def wait_gone(pids: set[int], timeout_s: float = 10.0) -> set[int]:
    """Wait until none of ``pids`` is alive; return those still alive at the timeout."""
    deadline = time.monotonic() + timeout_s
    alive = {p for p in pids if _stat(p) is not None}
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = {p for p in alive if _stat(p) is not None}
    return alive
