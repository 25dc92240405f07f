"""Inner training in one worker thread, with outer updates handed in between steps.

The thread runs inner steps; every H steps (a round boundary) it hands the loop a flat fp32
snapshot of theta and keeps training (overlap) or waits for the outer result (blocking). An
outer result arrives as new slow weights phi; the thread applies ``theta += phi - theta_r`` at the
first step boundary after it arrived, and at the latest before the next snapshot (overlap), or
sets ``theta = phi`` (blocking). Time spent waiting is idle time. The step of the phase at which
each update landed goes to the round log (``Boundary.applied_after``), so a replay of the node in
the simulator (which applies updates by the same rule, ``sim/swarm.py``) trains the same steps.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from locoswarm.node.ranks import Control, RankLost, Ranks
from locoswarm.tasks.inner import InnerConfig, InnerLoop, add_difference, flat_params, set_flat
from locoswarm.tasks.task import ReplicaTask

log = logging.getLogger("locoswarm.node.trainer")

__all__ = ["Boundary", "Trainer", "add_difference", "flat_params", "pick_device", "set_flat"]


def pick_device(name: str) -> torch.device:
    """``auto`` means the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Boundary:
    """What the thread hands the loop at the end of a round's inner phase."""

    outer_step: int
    theta: Tensor
    """Flat fp32 CPU snapshot of theta at the boundary."""
    loss: float
    state: dict[str, Any] | None = None
    applied_after: int | None = None
    """Steps of this phase run before the previous round's update landed (overlap)."""
    val_loss: float | None = None
    """Validation loss of the outer weights the trainer last received (every ``eval_every``
    boundaries; None between)."""


@dataclass
class TrainerStats:
    inner_steps: int = 0
    tokens: int = 0
    compute_s: float = 0.0
    idle_s: float = 0.0
    eval_s: float = 0.0
    """Seconds spent on validation (neither compute nor idle)."""
    last_loss: float = math.nan
    losses: list[float] = field(default_factory=list)


class Trainer:
    """Owns the model, the inner optimizer and the data stream of one node."""

    def __init__(
        self,
        task: ReplicaTask,
        inner: InnerConfig,
        *,
        inner_steps: int,
        total_steps: int | None,
        device: torch.device,
        tokens_per_step: int,
        eval_every: int = 0,
        ranks: Ranks | None = None,
    ) -> None:
        self.task = task
        self.ranks = ranks if ranks is not None and ranks.world > 1 else None
        """The node's other local ranks (None: one rank). Rank 0's thread drives them."""
        self.eval_every = eval_every
        self.model = task.model.to(device)
        self.device = device
        self.inner_steps = inner_steps
        self.tokens_per_step = tokens_per_step
        self.loop = InnerLoop(self.model, inner, total_steps)
        self._forward = self.ranks.wrap(self.model) if self.ranks is not None else self.model
        """What an inner step calls: the model, or its DDP wrapper across the node's ranks."""
        self._restored = False
        """A checkpoint or a late join changed the trainer since it was built."""
        self._rank_data: list[Any] | None = None
        """The other ranks' data positions at the last gather (or from the checkpoint)."""
        self.opt = self.loop.opt
        self.sched = self.loop.sched
        self.step = 0
        self.stats = TrainerStats()
        self._lock = threading.Lock()
        self._update: tuple[int, Tensor, Tensor] | None = None  # (outer_step, phi, theta_r)
        self._update_ready = threading.Condition(self._lock)
        self._applied = -1  # last outer step whose result was applied
        self._phi: Tensor | None = None
        """The outer weights last received (never changed in place), for the next boundary's
        validation only: dropped after it, so a round that moves on from them frees them."""
        self.overlap = True

    # -- called from the event loop --------------------------------------------------------------

    def deliver(self, outer_step: int, phi: Tensor, theta_r: Tensor) -> None:
        """Hand the thread round ``outer_step``'s new slow weights (thread-safe)."""
        with self._update_ready:
            self._update = (outer_step, phi, theta_r)
            self._update_ready.notify_all()

    # -- the thread ------------------------------------------------------------------------------

    def _apply_pending(self) -> None:
        with self._lock:
            update, self._update = self._update, None
        if update is None:
            return
        outer_step, phi, theta_r = update
        self._phi = phi
        if self._drives():
            assert self.ranks is not None
            if self.overlap:  # the followers add the same difference, bit for bit
                self.ranks.control(Control.ADD)
                self.ranks.tensor(phi - theta_r)
            else:
                self.ranks.control(Control.SET)
                self.ranks.tensor(phi)
        if self.overlap:
            add_difference(self.model, phi, theta_r)  # keep the progress made meanwhile
        else:
            set_flat(self.model, phi)
        self._applied = outer_step

    def _ready(self, outer_step: int) -> bool:
        """Round ``outer_step``'s result has arrived (and is not applied yet)."""
        with self._lock:
            return self._update is not None and self._update[0] >= outer_step

    def _wait_for(self, outer_step: int, stop: threading.Event) -> bool:
        """Block until round ``outer_step``'s result arrived; False when stopped first."""
        start = time.perf_counter()
        with self._update_ready:
            while (self._update is None or self._update[0] < outer_step) and not stop.is_set():
                if self._applied >= outer_step:
                    break
                self._update_ready.wait(0.1)
        self.stats.idle_s += time.perf_counter() - start
        self._apply_pending()
        return not stop.is_set()

    def inner_step(self) -> float:
        start = time.perf_counter()
        if self._drives():
            assert self.ranks is not None
            self.ranks.control(Control.STEP)
        self.model.train()
        batch = next(self.task.batches)
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                loss = self.task.loss(self._forward, _to(batch, self.device))
            value = self.loop.step(loss)  # with several ranks: DDP's gradient all-reduce
        except RuntimeError as exc:
            if self.ranks is None:
                raise
            self.ranks.lost_rank()
            raise RankLost(f"an inner step with the node's other ranks failed: {exc}") from exc
        self.step += 1
        self.stats.inner_steps += 1
        self.stats.tokens += self.tokens_per_step
        self.stats.compute_s += time.perf_counter() - start
        self.stats.last_loss = value
        self.stats.losses.append(value)
        del self.stats.losses[:-1000]
        return value

    def run(
        self,
        *,
        first_outer_step: int,
        stop: threading.Event,
        on_boundary: Callable[[Boundary], None],
        want_state: Callable[[int], bool],
        overlap: bool,
    ) -> None:
        """Train until ``stop`` is set. Runs in the trainer thread.

        Overlap: the update of round r lands at the first step boundary after it arrived, at
        the latest just before the snapshot of round r + 1 (waiting there is idle time).
        Blocking: the thread waits for it right after the snapshot.
        """
        self.overlap = overlap
        with self._followers():
            outer_step = first_outer_step
            losses: list[float] = []
            into_phase = 0
            applied_after: int | None = None
            while not stop.is_set():
                if (
                    overlap
                    and applied_after is None
                    and outer_step > first_outer_step
                    and self._ready(outer_step - 1)
                ):
                    self._apply_pending()
                    applied_after = into_phase
                losses.append(self.inner_step())
                into_phase += 1
                if self.step % self.inner_steps:
                    continue
                # A round boundary. The previous round's update must be in before we snapshot.
                if overlap and applied_after is None and outer_step > first_outer_step:
                    if not self._wait_for(outer_step - 1, stop):
                        break
                    applied_after = into_phase
                state = self.state_dict() if want_state(outer_step) else None
                theta = flat_params(self.model)
                val = self._validate(outer_step, theta)
                # The last outer weights are the outer state's: held here only for this
                # boundary's validation (the next boundary's comes with the next update), so a
                # round that moves on from them frees them.
                self._phi = None
                on_boundary(Boundary(outer_step, theta, _mean(losses), state, applied_after, val))
                losses = []
                into_phase = 0
                applied_after = None
                if not overlap and not self._wait_for(outer_step, stop):
                    break
                outer_step += 1

    def _validate(self, outer_step: int, theta: Tensor) -> float | None:
        """Every ``eval_every`` boundaries: the validation loss of the last outer weights (the
        model the swarm agrees on, as the simulator measures it), evaluated in the model itself:
        load phi, evaluate, load theta back from the boundary's snapshot (exact: the snapshot
        is fp32 and the round trip restores every parameter bit). No model copy is made."""
        if not self.eval_every or outer_step % self.eval_every or not self.task.val_batches:
            return None
        start = time.perf_counter()
        phi = self._phi
        if phi is not None:
            set_flat(self.model, phi)
        try:
            return self.task.validation_loss(self.model, self.device)
        finally:
            if phi is not None:
                set_flat(self.model, theta)
            self.stats.eval_s += time.perf_counter() - start

    # -- the node's other ranks ------------------------------------------------------------------

    @contextlib.contextmanager
    def _followers(self) -> Iterator[None]:
        """Rank 0 of several: hand the followers our state when a restore or a late join
        changed it (else DDP's start made every rank the same), and stop them at the end."""
        if self._drives() and self._restored:
            self._load_followers()
        try:
            yield
        finally:
            if self._drives():
                self._stop_followers()

    def _drives(self) -> bool:
        """Whether this is rank 0 of several, with its followers still there."""
        return self.ranks is not None and self.ranks.leader and self.ranks.live

    def _load_followers(self) -> None:
        """Hand the followers our trainer state (after a restore or a late join)."""
        assert self.ranks is not None
        self.ranks.control(Control.LOAD)
        self.ranks.objects(self._shared_state())

    def _shared_state(self) -> dict[str, Any]:
        return {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": _to(self.opt.state_dict(), torch.device("cpu")),
            "scheduler": self.sched.state_dict(),
            "step": self.step,
            "data_ranks": self._rank_data,
        }

    def _gather_followers(self) -> None:
        """The followers' data positions, for a checkpoint."""
        assert self.ranks is not None
        self.ranks.control(Control.STATE)
        gathered = self.ranks.gather(None)
        self._rank_data = None if gathered is None else gathered[1:]

    def _stop_followers(self) -> None:
        """Gather their data positions one last time (the final checkpoint), then stop them.
        After a failed collective (a rank died) there is no one left to tell."""
        assert self.ranks is not None
        try:
            self._gather_followers()
            self.ranks.control(Control.STOP)
        except RuntimeError as exc:
            log.warning("could not stop the node's other ranks cleanly: %s", exc)
        self.ranks.live = False

    def follow(self) -> None:
        """A follower rank: do what rank 0 says until it says stop."""
        ranks = self.ranks
        assert ranks is not None
        assert not ranks.leader
        while True:
            op = ranks.control()
            if op is Control.STEP:
                self.inner_step()
            elif op is Control.ADD:
                _add_flat(self.model, ranks.tensor(torch.empty(self.numel, dtype=torch.float32)))
            elif op is Control.SET:
                set_flat(self.model, ranks.tensor(torch.empty(self.numel, dtype=torch.float32)))
            elif op is Control.STATE:
                batches = self.task.batches
                ranks.gather(batches.state_dict() if hasattr(batches, "state_dict") else None)
            elif op is Control.LOAD:
                self._load_shared(ranks.objects(None), ranks.rank)
            else:
                return

    def _load_shared(self, state: dict[str, Any], rank: int) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        data = state.get("data_ranks")
        batches = self.task.batches
        position = data[rank - 1] if data and len(data) >= rank else None
        if position is not None and hasattr(batches, "load_state_dict"):
            batches.load_state_dict(position)
            log.info("rank %d: resumed its data position", rank)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # -- checkpoints -----------------------------------------------------------------------------

    def state_dict(self, *, copy_tensors: bool = True) -> dict[str, Any]:
        """A deep copy of everything that decides the next inner steps. ``copy_tensors`` False
        (the thread has stopped and nothing changes them while they are read, e.g. the final
        checkpoint): the model's and the optimizer's tensors themselves on the CPU, not copies
        (three model copies less for Adam)."""
        batches = self.task.batches
        if self._drives():
            self._gather_followers()
        optimizer = _to(self.opt.state_dict(), torch.device("cpu"))
        return {
            "data_ranks": self._rank_data,
            "model": {
                k: v.detach().to("cpu", copy=copy_tensors)
                for k, v in self.model.state_dict().items()
            },
            "optimizer": copy.deepcopy(optimizer) if copy_tensors else optimizer,
            "scheduler": self.sched.state_dict(),
            "step": self.step,
            "data": batches.state_dict() if hasattr(batches, "state_dict") else None,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self._rank_data = state.get("data_ranks")
        self._restored = True
        if state.get("data") is not None and hasattr(self.task.batches, "load_state_dict"):
            self.task.batches.load_state_dict(state["data"])
        torch.set_rng_state(state["rng_cpu"])
        if state.get("rng_cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])

    @torch.no_grad()
    def set_weights(self, flat: Tensor) -> None:
        """theta = flat (when the thread is not running)."""
        set_flat(self.model, flat)
        self._phi = flat
        self._restored = True


@torch.no_grad()
def _add_flat(model: torch.nn.Module, diff: Tensor) -> None:
    """theta += diff, one parameter at a time: what ``add_difference`` adds on rank 0, where
    ``diff`` is ``new - old`` (the same bits)."""
    offset = 0
    for p in model.parameters():
        n = p.numel()
        p.add_(diff[offset : offset + n].view_as(p).to(p.device, p.dtype))
        offset += n


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        # To the accelerator asynchronously; back to the CPU synchronously (the copy is read,
        # pickled or saved at once).
        return obj.to(device, non_blocking=device.type != "cpu")
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to(v, device) for v in obj)
    return obj
