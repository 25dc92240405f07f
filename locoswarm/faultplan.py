"""A declarative fault plan: the one seam through which tests and benchmarks inject faults.

A plan is a list of faults, each keyed by phase (where in the code it fires), optionally by peer
and outer step, and fired a limited number of times. Production code asks ``plan.fire(phase,
peer=..., outer_step=...)`` at its seams; with no plan (the default, and the only possibility
unless a test or bench passes ``--set debug.fault_plan=PATH``) nothing ever fires.

Leaf module: standard library only, so ``protocol`` and ``node`` can both use it.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

Action = Literal[
    "drop",
    "delay",
    "corrupt",
    "truncate",
    "stall",
    "kill",
    "nan",
    "raise",
    "scale",
    "invert",
    "noise",
]
ACTIONS: tuple[str, ...] = get_args(Action)
PHASES: tuple[str, ...] = (
    "send_chunk",  # protocol: before a payload chunk goes out (drop, delay, corrupt, truncate,
    #               stall, kill)
    "prepare",  # node: our outgoing message for a round (nan; scale, invert, noise: the weights
    #             we send are poisoned, our own state stays honest: a bad peer)
    "round",  # node: at a round boundary, before matchmaking (delay, stall, kill)
    "exchange",  # node: inside a round's exchange (raise: an unexpected error of our own)
    "apply",  # node: after the exchange, before the round's result is computed (raise)
    "checkpoint",  # node: after the temporary checkpoint file is written, before the rename (kill)
)


@dataclass
class Fault:
    """One fault: what, where, for whom and how often."""

    action: Action
    phase: str
    peer: str | None = None
    """Fire only for exchanges with this peer id (None: any)."""
    outer_step: int | None = None
    """Fire only at this outer step or later (None: any)."""
    chunk: int = 0
    """send_chunk: fire at this chunk index of a payload."""
    times: int = 1
    """How often it fires; -1 forever."""
    seconds: float = 0.0
    """delay and stall: how long."""
    factor: float = 10.0
    """scale: the factor; noise: the noise's RMS in units of the weights' RMS."""

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"fault action must be one of {ACTIONS}, got {self.action!r}")
        if self.phase not in PHASES:
            raise ValueError(f"fault phase must be one of {PHASES}, got {self.phase!r}")

    def matches(self, phase: str, peer: str | None, outer_step: int | None, chunk: int) -> bool:
        if self.times == 0 or phase != self.phase:
            return False
        if self.peer is not None and peer != self.peer:
            return False
        if self.outer_step is not None and (outer_step is None or outer_step < self.outer_step):
            return False
        return phase != "send_chunk" or chunk == self.chunk


class FaultPlan:
    """Thread-safe: the trainer thread and the event loop may both ask it."""

    def __init__(self, faults: list[Fault]) -> None:
        self.faults = faults
        self.fired: list[tuple[str, str, str | None, int | None]] = []
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: Path) -> FaultPlan:
        """Read a JSON list of faults (the fields of ``Fault``)."""
        try:
            items = json.loads(Path(path).read_text())
            return cls([Fault(**item) for item in items])
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"fault plan {path}: {exc}") from None

    def fire(
        self, phase: str, *, peer: str | None = None, outer_step: int | None = None, chunk: int = 0
    ) -> Fault | None:
        """The fault to inject here and now, if any (and count it)."""
        with self._lock:
            for fault in self.faults:
                if fault.matches(phase, peer, outer_step, chunk):
                    if fault.times > 0:
                        fault.times -= 1
                    self.fired.append((fault.action, phase, peer, outer_step))
                    return fault
        return None


NO_FAULTS = FaultPlan([])
"""The plan production code runs with."""
