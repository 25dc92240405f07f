"""The settings of one mode's round (``RoundConfig``) and the daemon's defaults for each mode.

Knows the modes, the wire widths the codecs support and what a message costs; nothing of the
maths itself (``rounds.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from locoswarm.compression.codecs import get_codec
from locoswarm.compression.sideinfo import SIQ_BITS
from locoswarm.errors import ConfigError

__all__ = [
    "MODES",
    "WIDTHS",
    "Design",
    "Mode",
    "RoundConfig",
    "default_round_config",
    "say_mode_defaults",
]

Mode = Literal["noloco", "diloco", "ef"]
MODES: tuple[Mode, ...] = ("noloco", "diloco", "ef")
Design = Literal["siq", "pull"]
WIDTHS: tuple[int, ...] = (*SIQ_BITS, 32)
"""Wire widths of a proposal or a shared momentum: side-information quantization, or fp32."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundConfig:
    """The maths of one mode's round."""

    mode: Mode = "noloco"
    lr: float = 0.7
    """noloco beta; diloco and ef: the outer learning rate."""
    momentum: float = 0.5
    """noloco alpha; diloco and ef: Nesterov momentum."""
    gamma: float | None = None
    """noloco: pull toward the group's mean phi (None: gamma == lr, the theta-only wire)."""
    share_momentum: bool = False
    """diloco: average the momenta within the group too (a second tensor on the wire)."""
    bits: int = 32
    """Proposal wire width: 32 sends fp32; 1, 2, 4, 8 or 16 side-information quantization."""
    momentum_bits: int = 16
    """Width of a shared momentum (siq, or 32 for fp32)."""
    block_size: int = 64
    """Elements per siq block (one bfloat16 step each)."""
    margin: float | None = None
    """siq: the lattice covers ``margin`` times the disagreement bound; None: 2 below 8 bits,
    16 from 8 bits up."""
    error_feedback: bool = True
    """ef: carry the rounding error into the next proposal."""
    design: Design = "siq"
    """ef: ``siq`` every round, or ``pull`` (a codec on the step, a 16-bit proposal every
    ``pull_every`` rounds)."""
    pull_every: int = 8
    """ef ``pull``: rounds from one 16-bit proposal to the next."""
    rotate: int = 1
    """ef siq: each round covers one in ``rotate`` blocks (block b when (b + round) % rotate
    == 0), so a message is ``rotate`` times smaller; the other blocks take our own step and
    meet a partner in a later round."""
    codec: str = "int4"
    """ef ``pull``: the step's codec."""
    codec_block: int = 4096
    clip: bool = True
    """Pairs: clip a partner's message toward our own (``robust.py``) before the mean."""
    clip_factor: float = 2.0
    """A partner's tensor may lie at most this many times the median of recent partner
    distances from ours (relative distance)."""
    clip_violation: float = 4.0
    """A partner beyond this many thresholds is blamed (counted toward a ban); an honest partner
    that took several solo rounds lies a few thresholds away, an attacker tens."""
    clip_window: int = 16
    """Partner distances the median is taken over."""
    clip_warmup: int = 4
    """Until this many distances are known, the threshold is ``clip_initial``."""
    clip_initial: float = 0.25
    """The threshold (relative distance) before the median is known."""
    max_weight_ratio: float = 8.0
    """Groups weight members by the tokens they trained in the round; no member weighs more
    than this many times the group's lightest (a claim is untrusted)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"sync mode must be one of {MODES}, got {self.mode!r}")
        if not self.lr > 0:
            raise ConfigError(f"outer lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"outer momentum must be in [0, 1), got {self.momentum}")
        for label, width in (("bits", self.bits), ("momentum_bits", self.momentum_bits)):
            if width != 32 and width not in SIQ_BITS:
                raise ConfigError(f"sync.{label} must be 32 or one of {SIQ_BITS}, got {width}")
        if self.mode == "ef" and self.bits == 32 and self.design == "siq":
            raise ConfigError("ef sends compressed proposals: sync.bits must be below 32")
        if self.block_size < 1 or self.pull_every < 1 or self.rotate < 1:
            raise ConfigError("sync.block_size, sync.pull_every and sync.rotate must be >= 1")
        if not (self.clip_factor > 1 and self.clip_initial > 0 and self.clip_violation >= 1):
            raise ConfigError(
                "sync.clip_factor must be > 1, sync.clip_initial > 0, sync.clip_violation >= 1"
            )
        if self.clip_window < 1 or not 1 <= self.clip_warmup <= self.clip_window:
            raise ConfigError("sync.clip_window must be >= 1, sync.clip_warmup in 1..clip_window")
        if not self.max_weight_ratio >= 1:
            raise ConfigError(f"sync.max_weight_ratio must be >= 1, got {self.max_weight_ratio}")
        if self.design not in ("siq", "pull"):
            raise ConfigError(f"sync.design must be siq or pull, got {self.design!r}")

    @property
    def effective_margin(self) -> float:
        if self.margin is not None:
            return self.margin
        return 2.0 if self.bits < 8 else 16.0

    @property
    def theta_only(self) -> bool:
        return self.gamma is None or self.gamma == self.lr

    def is_pull_round(self, round: int) -> bool:
        return self.mode == "ef" and self.design == "pull" and round % self.pull_every == 0

    def bits_per_element(self, numel: int) -> float:
        """Payload bits per parameter of one message (averaged over a pull cycle)."""
        if self.mode == "noloco":
            return 32.0 * (1 if self.theta_only else 2)
        if self.mode == "ef" and self.design == "pull":
            codec = get_codec(self.codec, block_size=self.codec_block)
            per = codec.encode(torch.ones(numel)).bits_per_element
            return ((self.pull_every - 1) * per + _siq_bits(16, self.block_size)) / self.pull_every
        total = 32.0 if self.bits == 32 else _siq_bits(self.bits, self.block_size) / self.rotate
        if self.mode == "diloco" and self.share_momentum:
            total += (
                32.0 if self.momentum_bits == 32 else _siq_bits(self.momentum_bits, self.block_size)
            )
        return total


def _siq_bits(bits: int, block_size: int) -> float:
    return bits + 24.0 / block_size


def default_round_config(mode: Mode) -> RoundConfig:
    """The daemon's defaults for each mode (the best settings measured in bench/convergence.py)."""
    if mode == "noloco":
        return RoundConfig(mode="noloco", lr=0.7, momentum=0.5)
    if mode == "diloco":
        return RoundConfig(
            mode="diloco",
            lr=0.7,
            momentum=0.7,
            share_momentum=True,
            bits=16,
            momentum_bits=8,
            block_size=256,
        )
    return RoundConfig(mode="ef", lr=0.7, momentum=0.7, bits=4, block_size=64)


def say_mode_defaults(name: str, modes: tuple[Mode, ...] = MODES) -> Callable[[], str]:
    """Says the daemon's default of round setting ``name`` in each of ``modes`` ("noloco 0.5,
    diloco 0.8, ef 0.8"), for help text; evaluated when the help is built."""

    def say() -> str:
        return ", ".join(f"{m} {getattr(default_round_config(m), name)}" for m in modes)

    return say
