"""Configuration of one simulated swarm run.

Knows the knobs of the simulator (strategy, replicas, schedule, modelled network, faults); knows
nothing about how the maths or the task is implemented.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from locoswarm.errors import ConfigError
from locoswarm.peers.config import PAIRINGS, Pairing, default_pairing
from locoswarm.sync.robust import ATTACKS
from locoswarm.sync.round_config import RoundConfig, default_round_config
from locoswarm.tasks.inner import InnerConfig
from locoswarm.tasks.task import TaskConfig

Strategy = Literal["ddp", "diloco", "noloco", "ef", "solo"]
STRATEGIES: tuple[Strategy, ...] = ("ddp", "diloco", "noloco", "ef", "solo")


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
    """One simulated run: N replicas of a task under one synchronisation strategy, scheduled as
    the daemon schedules its rounds."""

    strategy: Strategy = "noloco"
    """ddp (gradients averaged every step), diloco, noloco, ef (compressed proposals) or solo (no
    communication). diloco, noloco and ef run ``sync/rounds.py``, the daemon's round."""
    num_replicas: int = 8
    """Number of simulated nodes."""
    rounds: int = 40
    """Outer rounds; every strategy runs rounds * inner_steps inner steps."""
    inner_steps: int = 50
    """H, inner steps per round."""
    seed: int = 0
    """Seeds the model initialisation, the data order and the faults."""
    task: TaskConfig = field(default_factory=TaskConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    sync: RoundConfig | None = None
    """The round's maths; None takes the daemon's defaults for the strategy."""
    group_size: int = 2
    """Members per group (the daemon's ``sync.group_size``); 0 means every present replica (an
    all-reduce: the reference DiLoCo)."""
    pairing: Pairing | None = None
    """random: the daemon's seeded shuffle per round; hypercube: partner i XOR 2^(r mod d);
    hypercube-shuffled: the same with the ranks reshuffled every d rounds. Unset: the daemon's
    default for the mode (``default_pairing``)."""
    overlap: bool = True
    """Apply each round's update one phase late (the daemon's default); False blocks."""
    apply_delay: int | None = None
    """With overlap: inner steps of the next phase run before a round's update lands. None
    models the daemon, which applies an update as soon as it arrives: the exchange's transfer
    time on the modelled network (latency and bandwidth), in the replica's steps, at most H."""
    network: NetworkModel = field(default_factory=NetworkModel)
    miss_prob: float = 0.0
    """Probability that a replica misses a round's exchange (then it takes a solo outer step)."""
    eval_every: int = 1
    """Evaluate every this many rounds (and always after the last)."""
    run_id: str = "sim"
    """Seeds the pairing shuffle, as the daemon's run id does."""
    attack: str | None = None
    """Bad replicas (``attackers``) send poisoned weights every round: scale, invert or noise
    (``sync/robust.py``); None: every replica is honest."""
    attackers: tuple[int, ...] = ()
    attack_factor: float = 10.0
    """scale: the factor; noise: the noise's RMS in units of the weights' RMS."""
    tokens: tuple[float, ...] = ()
    """Tokens each replica trains per round, as its node advertises them (a node with more
    GPUs trains more); groups weight their means by them. Empty: every replica counts equally."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"sim.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.num_replicas < 1:
            raise ConfigError(f"sim.num_replicas must be >= 1, got {self.num_replicas}")
        if self.rounds < 1:
            raise ConfigError(f"sim.rounds must be >= 1, got {self.rounds}")
        if self.inner_steps < 1:
            raise ConfigError(f"sim.inner_steps must be >= 1, got {self.inner_steps}")
        if self.apply_delay is not None and not 0 <= self.apply_delay <= self.inner_steps:
            raise ConfigError(f"sim.apply_delay must be in 0..inner_steps, got {self.apply_delay}")
        if not 0 <= self.miss_prob < 1:
            raise ConfigError(f"sim.miss_prob must be in [0, 1), got {self.miss_prob}")
        if self.eval_every < 1:
            raise ConfigError(f"sim.eval_every must be >= 1, got {self.eval_every}")
        if self.group_size == 1 or self.group_size < 0:
            raise ConfigError(f"sim.group_size must be 0 (all) or >= 2, got {self.group_size}")
        if self.pairing is not None and self.pairing not in PAIRINGS:
            raise ConfigError(
                f"sim.pairing must be one of {', '.join(PAIRINGS)}, got {self.pairing!r}"
            )
        if self.pairing not in (None, "random") and self.group_size != 2:
            raise ConfigError(f"sim.pairing {self.pairing} pairs nodes: group_size must be 2")
        if self.attack is not None and self.attack not in ATTACKS:
            raise ConfigError(f"sim.attack must be one of {ATTACKS}, got {self.attack!r}")
        if self.tokens and (len(self.tokens) != self.num_replicas or min(self.tokens) <= 0):
            raise ConfigError(f"sim.tokens needs one positive count per replica, got {self.tokens}")
        if any(not 0 <= i < self.num_replicas for i in self.attackers):
            raise ConfigError(f"sim.attackers must be replica indices, got {self.attackers}")
        rc = self.round_config
        if rc is not None and rc.mode != self.strategy:
            raise ConfigError(f"sim.sync.mode {rc.mode!r} differs from strategy {self.strategy!r}")
        if rc is not None and self.group_size != 2 and rc.bits != 32:
            raise ConfigError("groups other than pairs average fp32 proposals: sync.bits 32")
        if self.network.speeds and len(self.network.speeds) != self.num_replicas:
            raise ConfigError(
                f"network.speeds has {len(self.network.speeds)} entries for "
                f"{self.num_replicas} replicas"
            )

    @property
    def round_config(self) -> RoundConfig | None:
        """The round maths actually used (None for ddp and solo)."""
        if self.strategy == "ddp" or self.strategy == "solo":
            return None
        return self.sync if self.sync is not None else default_round_config(self.strategy)

    @property
    def schedule(self) -> Pairing:
        """The pairing schedule actually used (the mode's default when none is set)."""
        if self.pairing is not None:
            return self.pairing
        return default_pairing(self.strategy, self.group_size)

    @property
    def h(self) -> int:
        """Inner steps per round."""
        return self.inner_steps

    @property
    def total_steps(self) -> int:
        """Inner steps each replica takes over the run."""
        return self.rounds * self.h
