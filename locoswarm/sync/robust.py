"""Averaging that one bad partner cannot wreck: self-centred clipping of a partner's message.

A pair's mean gives the partner half the say over our new state, so one partner that sends
scaled, inverted or noisy weights moves us as far as it likes. Before the mean, each of the
partner's tensors ``x_j`` is pulled toward our own entry ``x_i``:

    x_j <- x_i + (x_j - x_i) * min(1, tau / d),   d = |x_j - x_i| / |x_i|

(self-centred clipping, He, Karimireddy and Jaggi, "Byzantine-robust decentralized learning via
self-centered clipping", arXiv 2202.01545), so a partner moves us by at most ``tau / 2`` of our
own norm. ``tau`` is ``clip_factor`` times the median of the last ``clip_window`` partner
distances of that tensor (the swarm's own scale of disagreement, which shrinks as replicas
agree; a clipped distance enters as ``tau``); until ``clip_warmup`` distances are known it is
``clip_initial``. Honest partners sit near the median and are rarely touched; a bad partner is
clipped every time it exchanges, and an exchange beyond ``clip_violation`` times ``tau`` (before
the median is known, times ``clip_initial``) counts toward its ban.

Pure torch and deterministic: the daemon, the simulator and the replay each keep one ``Clipper``
per node and call it on every pair's decoded message, so all three compute the same round.
Groups of more than two average by reduce-scatter, where no member sees another's whole vector;
they are not clipped.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from locoswarm.sync.round_config import RoundConfig

__all__ = [
    "ATTACKS",
    "DISTANCE_CHUNK",
    "Clip",
    "Clipper",
    "Distance",
    "lerp_into",
    "own_step",
    "poison",
    "relative_distance",
]

_CHUNK = 1 << 16
DISTANCE_CHUNK = _CHUNK
"""Distances are summed this many elements at a time: no model-sized temporary (at 2^20 the
float64 temporaries of two chunks, 32 MB, were alive at once: measured at a node's peak)."""

ATTACKS: tuple[str, ...] = ("scale", "invert", "noise")
"""What a bad peer does to the weights it sends (tests, benchmarks and the fault plan)."""


@dataclass(frozen=True, slots=True)
class Clip:
    """One tensor of one partner's message."""

    name: str
    distance: float
    """``|theirs - ours| / |ours|`` before clipping (nan when our norm is zero)."""
    threshold: float
    clipped: bool
    violation: bool = False
    """Far beyond the threshold (``clip_violation`` times it): what counts toward a ban. A
    partner just past the threshold is clipped but not blamed (honest distances vary)."""

    @property
    def weight(self) -> float:
        """How far toward the partner's tensor a clipped one goes from ours (``torch.lerp``'s
        weight): ``threshold / distance``; 1 when not clipped."""
        return self.threshold / self.distance if self.clipped else 1.0


def relative_distance(ours: Tensor, theirs: Tensor) -> float:
    """``|theirs - ours| / |ours|``, in float64, a chunk at a time (nan when ``|ours|`` is 0)."""
    a, b = ours.reshape(-1), theirs.reshape(-1)
    total = Distance()
    for i0 in range(0, a.numel(), _CHUNK):
        total.add(a[i0 : i0 + _CHUNK], b[i0 : i0 + _CHUNK])
    return total.value


class Distance:
    """``relative_distance`` summed a chunk at a time by its caller: fed the chunks of
    ``relative_distance``'s (``DISTANCE_CHUNK`` elements from the start, in order), the same
    bits."""

    def __init__(self) -> None:
        self.diff = 0.0
        self.norm = 0.0

    def add(self, ours: Tensor, theirs: Tensor) -> None:
        # Two float64 temporaries per chunk, squared in place: the same sums as
        # ``(y - x).square().sum()`` and ``x.square().sum()``.
        x, y = ours.double(), theirs.double()
        self.diff += float(y.sub_(x).square_().sum())
        self.norm += float(x.square_().sum())

    @property
    def value(self) -> float:
        return math.sqrt(self.diff / self.norm) if self.norm > 0 else math.nan


class Clipper:
    """One node's clipping state: the recent partner distances of each message tensor."""

    def __init__(self, cfg: RoundConfig) -> None:
        self.cfg = cfg
        self._seen: dict[str, deque[float]] = {}

    def threshold(self, name: str, step: float | None = None) -> float:
        """The largest relative distance a partner's ``name`` may have from ours. Before the
        median is known, ``clip_initial``, or ``clip_factor`` times ``step`` (how far our own
        weights moved this round) when that is smaller."""
        seen = self._seen.get(name)
        if seen is None or len(seen) < self.cfg.clip_warmup:
            if step is None or math.isnan(step) or step <= 0:
                return self.cfg.clip_initial
            return min(self.cfg.clip_initial, self.cfg.clip_factor * step)
        return self.cfg.clip_factor * statistics.median(seen)

    def clip(
        self,
        own: Mapping[str, Tensor],
        theirs: Mapping[str, Tensor],
        phi: Tensor | None = None,
        *,
        step: float | None = None,
        reuse: bool = False,
    ) -> tuple[dict[str, Tensor], list[Clip]]:
        """A pair partner's decoded tensors clipped toward ours (a clipped tensor is a new one;
        the others are ``theirs``'s own), and one ``Clip`` per tensor. Remembers the distances.
        ``phi``: our outer weights before the round; how far our own weights (theta, or the
        proposal) moved from them bounds the weights' threshold until the median is known.
        ``step``: that distance already measured (``own_step(own, phi)``), in place of ``phi``.
        ``reuse``: ``theirs``'s tensors are the caller's to overwrite (a partner's decoded
        message), so a clipped tensor is computed in its own memory, the same bits.
        """
        out, clips = dict(theirs), []
        if step is None:
            step = own_step(own, phi)
        for name, t in theirs.items():
            ours = own[name]
            clip = self.judge(name, relative_distance(ours, t), step)
            clips.append(clip)
            if clip.clipped:
                weight = clip.weight
                out[name] = lerp_into(ours, t, weight) if reuse else torch.lerp(ours, t, weight)
        return out, clips

    def judge(self, name: str, d: float, step: float | None) -> Clip:
        """The clipping of a partner's ``name`` that lies ``d`` (``relative_distance``) from
        ours; remembers the distance. ``step``: ``own_step`` of our message."""
        if not self.cfg.clip or math.isnan(d):
            return Clip(name, d, math.inf, False)
        tau = self.threshold(name, step if name in WEIGHTS else None)
        known = len(self._seen.get(name, ())) >= self.cfg.clip_warmup
        clipped = d > tau
        # A clipped distance counts as the threshold: a bad partner cannot drag the median
        # up, while a swarm whose honest distances grow moves it up within half a window.
        seen = self._seen.setdefault(name, deque(maxlen=self.cfg.clip_window))
        seen.append(min(d, tau))
        # Before the median is known, blame against clip_initial only: a late joiner's first
        # exchanges (weights of another round) are clipped to our own step's scale, but not
        # held against it.
        blame_at = tau if known else self.cfg.clip_initial
        violation = d > self.cfg.clip_violation * blame_at
        return Clip(name, d, tau, clipped, violation)

    def state(self) -> dict[str, list[float]]:
        """The remembered distances (checkpoints)."""
        return {name: list(seen) for name, seen in self._seen.items()}

    def load(self, state: Mapping[str, list[float]]) -> None:
        self._seen = {
            str(name): deque((float(d) for d in seen), maxlen=self.cfg.clip_window)
            for name, seen in state.items()
        }


def lerp_into(ours: Tensor, theirs: Tensor, weight: float) -> Tensor:
    """``torch.lerp(ours, theirs, weight)`` written into ``theirs``, a chunk at a time: the same
    kernel on the same operands, element by element, so the same bits, and no new tensor."""
    if not theirs.is_contiguous() or theirs.shape != ours.shape:
        return torch.lerp(ours, theirs, weight)
    a, b = ours.reshape(-1), theirs.view(-1)
    for i0 in range(0, b.numel(), _CHUNK):
        c = b[i0 : i0 + _CHUNK]
        torch.lerp(a[i0 : i0 + _CHUNK], c, weight, out=c)
    return theirs


WEIGHTS = frozenset({"theta", "phi", "proposal"})
"""Message tensors that are weights (their partners' distance scales with our own step)."""


def own_step(own: Mapping[str, Tensor], phi: Tensor | None) -> float | None:
    """How far our message's weights moved from ``phi`` (relative), or None."""
    if phi is None:
        return None
    for name in ("theta", "proposal"):
        if name in own and own[name].shape == phi.shape:
            return relative_distance(phi, own[name])
    return None


def poison(theta: Tensor, attack: str, factor: float, *, seed: int) -> Tensor:
    """What a bad peer sends in place of its weights ``theta`` (a new tensor): ``scale`` times
    ``factor``, ``invert`` (``-theta``), or ``noise`` (Gaussian noise of ``factor`` times theta's
    RMS added; seeded, so runs repeat)."""
    if attack == "scale":
        return theta * factor
    if attack == "invert":
        return -theta
    if attack == "noise":
        gen = torch.Generator().manual_seed(seed)
        rms = float(theta.double().square().mean().sqrt())
        noise = torch.randn(theta.shape, generator=gen, dtype=theta.dtype)
        return theta + noise.mul_(factor * rms)
    raise ValueError(f"attack must be one of {ATTACKS}, got {attack!r}")
