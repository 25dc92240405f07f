"""Suite-wide fixtures.

Tests run in parallel (pytest-xdist), so a test must not judge leftovers by scanning every
process of the machine: another worker's DHT and p2pd would count as its own. Each worker makes
itself a child subreaper, so a process that a test started, directly or not, and that outlives its
parent (an orphaned p2pd) is re-parented to the worker instead of to init: "below this process"
then covers everything a test left behind, and nothing another worker started.
"""

from __future__ import annotations

import ctypes
import sys

PR_SET_CHILD_SUBREAPER = 36


def pytest_configure() -> None:
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
