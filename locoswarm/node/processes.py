"""Process trees of a node: its DHT process and p2pd, the nodes of ``locoswarm demo``.

The daemon kills what is below it on a forced exit; tests and benchmarks that start nodes find
and kill everything those started (by tree, process group or name). Read with psutil. A zombie
counts as gone: it is dead, its parent just has not reaped it yet.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import psutil


def _live(proc: psutil.Process) -> bool:
    """Whether ``proc`` still runs (not gone, not a zombie)."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def alive(pid: int) -> bool:
    """Whether a process ``pid`` runs (a zombie does not)."""
    try:
        return _live(psutil.Process(pid))
    except psutil.Error:
        return False


def all_pids() -> list[int]:
    return psutil.pids()


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``."""
    try:
        below = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return set()
    return {child.pid for child in below if _live(child)}


def in_group(pgid: int) -> set[int]:
    """Live processes of process group ``pgid``."""
    found = set()
    for proc in psutil.process_iter():
        try:
            group = os.getpgid(proc.pid)
        except ProcessLookupError:
            continue
        if group == pgid and _live(proc):
            found.add(proc.pid)
    return found


def named(name: str, *, below: int | None = None) -> set[int]:
    """Live processes whose command name is ``name`` (e.g. ``p2pd``); with ``below``, only those
    below that process."""
    found = set()
    if below is not None:
        try:
            candidates = psutil.Process(below).children(recursive=True)
        except psutil.Error:
            return set()
    else:
        candidates = list(psutil.process_iter())
    for proc in candidates:
        try:
            matches = proc.name() == name
        except psutil.Error:
            continue
        if matches and _live(proc):
            found.add(proc.pid)
    return found


def kill_tree(pid: int, *, include_self: bool = True) -> None:
    """SIGKILL everything below ``pid``, and ``pid`` itself unless ``include_self`` is False."""
    for victim in [*descendants(pid), *([pid] if include_self else [])]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


def wait_gone(pids: set[int], timeout_s: float = 10.0) -> set[int]:
    """Wait until none of ``pids`` is alive; return those still alive at the timeout."""
    deadline = time.monotonic() + timeout_s
    alive_now = {p for p in pids if alive(p)}
    while alive_now and time.monotonic() < deadline:
        time.sleep(0.05)
        alive_now = {p for p in alive_now if alive(p)}
    return alive_now
