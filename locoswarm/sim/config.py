"""Configuration of one simulated swarm run.

Knows the knobs of the simulator (strategy, replicas, schedule, modelled network, faults); knows
nothing about how the maths or the task is implemented.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from locoswarm.compression.config import CompressionConfig
from locoswarm.errors import ConfigError
from locoswarm.sync.diloco import DiLoCoConfig
from locoswarm.sync.noloco import NoLoCoConfig
from locoswarm.tasks.task import TaskConfig

Strategy = Literal["ddp", "diloco", "noloco", "ef", "solo"]
STRATEGIES: tuple[Strategy, ...] = ("ddp", "diloco", "noloco", "ef", "solo")

EF_DEFAULT_INNER_STEPS = 10
"""S, the default inner steps between compressed error-feedback exchanges."""


@dataclass(frozen=True, kw_only=True, slots=True)
class InnerConfig:
    """The inner optimizer: AdamW with linear warm-up, cosine decay and gradient clipping."""

    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr * min_lr_ratio at the last inner step."""
    warmup_steps: int = 100
    """Linear warm-up length in inner steps."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Clip the gradient's global L2 norm to this; 0 disables clipping."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"inner.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"inner.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("inner.warmup_steps, grad_clip and weight_decay must be >= 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class NetworkModel:
    """How long compute and transfers take, in simulated seconds (no real sockets)."""

    step_time_s: float = 0.1
    """Inner step time of a replica of speed 1.0."""
    speeds: tuple[float, ...] = ()
    """Relative speed of each replica (2.0 = twice as fast); empty means all 1.0."""
    latency_s: float = 0.05
    """One-way latency of one message."""
    bandwidth_bytes_per_s: float = 12.5e6
    """Per-replica link bandwidth (12.5e6 bytes/s = 100 Mbit/s)."""

    def __post_init__(self) -> None:
        if self.step_time_s <= 0 or self.bandwidth_bytes_per_s <= 0 or self.latency_s < 0:
            raise ConfigError("network: step_time_s and bandwidth must be > 0, latency >= 0")
        if any(s <= 0 for s in self.speeds):
            raise ConfigError(f"network.speeds must all be > 0, got {self.speeds}")


@dataclass(frozen=True, kw_only=True, slots=True)
class SimConfig:
    """One simulated run: N replicas of a task under one synchronisation strategy."""

    strategy: Strategy = "noloco"
    """ddp (gradients averaged every step), diloco, noloco, ef (compressed error-feedback pair
    exchange of pseudo-gradients, then DiLoCo's outer step) or solo (no communication)."""
    num_replicas: int = 8
    """Number of simulated nodes."""
    rounds: int = 40
    """Outer rounds; every strategy runs rounds * inner_steps inner steps."""
    inner_steps: int | None = None
    """H, inner steps per round; None takes the strategy's default (noloco 50, diloco 500)."""
    seed: int = 0
    """Seeds the model initialisation, the data order, the pairing and the faults."""
    task: TaskConfig = field(default_factory=TaskConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    diloco: DiLoCoConfig = field(default_factory=DiLoCoConfig)
    noloco: NoLoCoConfig = field(default_factory=NoLoCoConfig)
    network: NetworkModel = field(default_factory=NetworkModel)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    """Codec and error feedback for diloco and ef payloads (noloco, ddp, solo: fp32 only)."""
    miss_prob: float = 0.0
    """Probability that a replica misses a round's exchange (then it takes a solo outer step)."""
    eval_every: int = 1
    """Evaluate every this many rounds (and always after the last)."""
    bytes_per_element: int = 4
    """Wire size of one parameter element (fp32: 4)."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"sim.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.num_replicas < 1:
            raise ConfigError(f"sim.num_replicas must be >= 1, got {self.num_replicas}")
        if self.rounds < 1:
            raise ConfigError(f"sim.rounds must be >= 1, got {self.rounds}")
        if self.inner_steps is not None and self.inner_steps < 1:
            raise ConfigError(f"sim.inner_steps must be >= 1, got {self.inner_steps}")
        if not 0 <= self.miss_prob < 1:
            raise ConfigError(f"sim.miss_prob must be in [0, 1), got {self.miss_prob}")
        if self.eval_every < 1:
            raise ConfigError(f"sim.eval_every must be >= 1, got {self.eval_every}")
        if not self.compression.lossless and self.strategy in ("noloco", "ddp", "solo"):
            raise ConfigError(
                f"compression.codec {self.compression.codec!r} applies to diloco and ef only; "
                f"{self.strategy} sends fp32 (see README, 'Compression')"
            )
        if self.strategy == "ef" and self.compression.error_feedback == "econtrol":
            raise ConfigError(
                "compression.error_feedback 'econtrol' needs every receiver to track each "
                "sender's estimator, which changing pairs cannot; use it with diloco, or ef14"
            )
        if self.network.speeds and len(self.network.speeds) != self.num_replicas:
            raise ConfigError(
                f"network.speeds has {len(self.network.speeds)} entries for "
                f"{self.num_replicas} replicas"
            )

    @property
    def h(self) -> int:
        """Inner steps per round actually used."""
        if self.inner_steps is not None:
            return self.inner_steps
        if self.strategy == "diloco":
            return self.diloco.inner_steps
        if self.strategy == "ef":
            return EF_DEFAULT_INNER_STEPS
        return self.noloco.inner_steps

    @property
    def total_steps(self) -> int:
        """Inner steps each replica takes over the run."""
        return self.rounds * self.h
