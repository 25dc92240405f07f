"""The C allocator's settings for a process that allocates and frees model-sized tensors.

glibc's malloc raises its mmap threshold every time a block it had mmapped is freed (up to
32 MiB), so after the first rounds a node's round temporaries (quantized payloads, decoded chunks,
messages of a few MiB) come from the heap instead of fresh mappings, and from one arena per
thread that allocated them (the trainer thread, ``asyncio.to_thread`` workers, gRPC's threads).
Freed heap memory is rarely returned to the system, so resident memory climbs with every round
whose temporaries land at a new place, and its peak sits well above what is live. A fixed
threshold (which also stops the dynamic adjustment) hands every large block back to the system
when it is freed, and a small arena count stops each thread from growing its own heap. The
threshold sits above the 4 MiB message chunks (their buffers are reused within a round instead of
being fresh pages for every message), and after each round ``release_free_memory`` hands what the
round freed in the heaps back to the system. Measured in bench/swarm.py and bench/transport.py
(docs/BENCHMARKS.md, issue 14). Other C libraries (musl, macOS) are left as they are.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass

from locoswarm.node.config import TrainerConfig

log = logging.getLogger("locoswarm.node")

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


@dataclass(frozen=True, slots=True)
class AllocatorTuning:
    """What ``tune_allocator`` did."""

    applied: tuple[str, ...]
    """The settings glibc accepted, as ``name=value``."""
    skipped: str | None = None
    """Why nothing was applied (not glibc, settings off), or None."""


@functools.cache
def _glibc() -> ctypes.CDLL | str:
    """glibc, loaded once; or why not, in words."""
    name = platform.libc_ver()[0]
    if name != "glibc":
        return f"the C library is not glibc ({name or '?'})"
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError as exc:
        return f"libc.so.6 could not be loaded: {exc}"


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, looked up once; None without glibc."""
    libc = _glibc()
    if isinstance(libc, str):
        return None
    try:
        trim = libc.malloc_trim
    except AttributeError:
        return None
    trim.argtypes = (ctypes.c_size_t,)
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Hand the free memory inside glibc's heaps back to the system (``malloc_trim(0)``: every
    arena, not only the top of each); False where there is no glibc. What a round freed stays
    in the heaps otherwise, above what training needs between rounds. Releases the GIL while it
    runs (ctypes): call it from a worker thread to keep an event loop free."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def tune_allocator(mmap_threshold: int, arena_max: int, trim_threshold: int = 0) -> AllocatorTuning:
    """Fix glibc's mmap threshold at ``mmap_threshold`` bytes and its trim threshold at
    ``trim_threshold`` (0: the mmap threshold), and cap its arenas at ``arena_max``; an
    ``mmap_threshold`` or ``arena_max`` of 0 leaves that setting as glibc chose it (and a trim
    threshold of 0 then too). Call it early, before the model is built (arenas already made
    stay)."""
    if mmap_threshold <= 0 and arena_max <= 0 and trim_threshold <= 0:
        return AllocatorTuning((), "off")
    libc = _glibc()
    if isinstance(libc, str):
        return AllocatorTuning((), libc)
    try:
        mallopt = libc.mallopt
    except AttributeError as exc:
        return AllocatorTuning((), f"mallopt is not available: {exc}")
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    wanted: list[tuple[str, int, int]] = []
    if mmap_threshold > 0:
        wanted.append(("mmap_threshold", M_MMAP_THRESHOLD, mmap_threshold))
    if trim_threshold > 0 or mmap_threshold > 0:
        wanted.append(("trim_threshold", M_TRIM_THRESHOLD, trim_threshold or mmap_threshold))
    if arena_max > 0:
        wanted.append(("arena_max", M_ARENA_MAX, arena_max))
    applied = []
    for name, param, value in wanted:
        if mallopt(param, value) == 1:
            applied.append(f"{name}={value}")
        else:
            log.warning("the C allocator refused %s=%d; it keeps its own setting", name, value)
    return AllocatorTuning(tuple(applied))


def tune_for(trainer: TrainerConfig | None = None) -> AllocatorTuning:
    """``tune_allocator`` with a node's settings (``trainer``'s, by default the node's defaults):
    what the daemon applies, and what benchmarks that stand for a node apply."""
    t = trainer if trainer is not None else TrainerConfig()
    return tune_allocator(t.malloc_mmap_threshold, t.malloc_arena_max, t.malloc_trim_threshold)
