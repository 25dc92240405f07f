"""The C allocator settings a node applies at start (glibc's mallopt)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from locoswarm.errors import ConfigError
from locoswarm.node.allocator import tune_allocator
from locoswarm.node.config import load_config

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")


def _in_child(code: str) -> str:
    """What ``code`` prints, run in a fresh interpreter: allocator settings are a process's for
    good."""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout.strip()


def test_zero_leaves_the_allocator_alone() -> None:
    tuning = tune_allocator(0, 0)
    assert tuning.applied == ()
    assert tuning.skipped == "off"


@glibc
def test_glibc_takes_the_node_defaults() -> None:
    code = "from locoswarm.node.allocator import tune_for\nprint(','.join(tune_for().applied))\n"
    assert _in_child(code) == "mmap_threshold=8388608,trim_threshold=33554432,arena_max=2"


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("trainer.malloc_arena_max", -1, "must be >= 0"),
        ("trainer.malloc_mmap_threshold", -5, "must be >= 0"),
        ("trainer.malloc_trim_threshold", -1, "must be >= 0"),
        ("trainer.malloc_trim_threshold", 1 << 31, "at most 1 GiB"),
        ("trainer.malloc_arena_max", 5000, "at most 1024"),
        ("trainer.malloc_mmap_threshold", 64 * 1024 * 1024, "at most 32 MiB"),
    ],
)
def test_bad_allocator_settings_name_the_key(key: str, value: int, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as err:
        load_config(overrides={key: value}, environ={})
    assert key.split(".")[1] in str(err.value)


@glibc
def test_free_heap_memory_goes_back_to_the_system() -> None:
    # 64 MiB in 1 MiB blocks from the heap (threshold 8 MiB), all freed but one at
    # the top that pins the heap; malloc_trim(0) must hand the freed pages back.
    code = (
        "import ctypes, psutil\n"
        "from locoswarm.node.allocator import release_free_memory, tune_allocator\n"
        "tune_allocator(8 << 20, 1, 1 << 30)\n"
        "libc = ctypes.CDLL('libc.so.6')\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "libc.free.argtypes = (ctypes.c_void_p,)\n"
        "blocks = [libc.malloc(1 << 20) for _ in range(65)]\n"
        "for b in blocks:\n"
        "    ctypes.memset(b, 1, 1 << 20)\n"
        "for b in blocks[:-1]:\n"
        "    libc.free(b)\n"
        "before = psutil.Process().memory_info().rss\n"
        "print(release_free_memory(), (before - psutil.Process().memory_info().rss) >> 20)\n"
    )
    done, freed_mib = _in_child(code).split()
    assert done == "True"
    assert int(freed_mib) >= 48


@glibc
def test_a_trim_threshold_alone_is_applied_and_zero_follows_the_mmap_threshold() -> None:
    code = (
        "from locoswarm.node.allocator import tune_allocator\n"
        "print(','.join(tune_allocator(0, 0, 1 << 20).applied))\n"
        "print(','.join(tune_allocator(1 << 20, 0).applied))\n"
    )
    alone, follows = _in_child(code).splitlines()
    assert alone == "trim_threshold=1048576"
    assert follows == "mmap_threshold=1048576,trim_threshold=1048576"


def test_without_glibc_nothing_is_released(monkeypatch: pytest.MonkeyPatch) -> None:
    from locoswarm.node import allocator

    allocator._malloc_trim.cache_clear()
    allocator._glibc.cache_clear()
    monkeypatch.setattr(platform, "libc_ver", lambda: ("musl", "1.2"))
    try:
        assert allocator.release_free_memory() is False
        assert allocator.tune_allocator(1 << 20, 2).skipped == "the C library is not glibc (musl)"
    finally:
        allocator._malloc_trim.cache_clear()
        allocator._glibc.cache_clear()
