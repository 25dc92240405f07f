"""The node's one config object, ``NodeConfig``, and how it is loaded.

Precedence: defaults < TOML file < ``LOCOSWARM_SECTION__KEY`` environment variables < flags.
Unknown keys and badly typed values are a ``ConfigError`` naming the key. Each section is the
dataclass its owner package defines; this module only composes and loads them.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from locoswarm.errors import ConfigError
from locoswarm.peers.config import PeersConfig
from locoswarm.protocol.config import ProtocolConfig
from locoswarm.settings import build, merge, nest
from locoswarm.sync.round_config import RoundConfig, default_round_config
from locoswarm.tasks.inner import InnerConfig
from locoswarm.tasks.task import TaskConfig

SyncMode = Literal["noloco", "diloco", "ef"]
ENV_PREFIX = "LOCOSWARM_"


@dataclass(frozen=True, kw_only=True, slots=True)
class SyncConfig:
    """The outer step: which algorithm, how often, with what optimizer, and how long to wait."""

    mode: SyncMode = "noloco"
    """noloco (pairs, modified Nesterov), diloco (Nesterov on averaged outer gradients), ef
    (compressed error-feedback exchanges of outer gradients)."""
    inner_steps: int = 50
    """H: inner steps per round."""
    outer_lr: float | None = None
    """noloco's beta; diloco's and ef's outer learning rate. None: the mode's default."""
    outer_momentum: float | None = None
    """noloco's alpha; diloco's and ef's Nesterov momentum. None: the mode's default."""
    bits: int | None = None
    """Proposal wire width: 32 (fp32) or 1, 2, 4, 8, 16 (side-information quantization). None:
    the mode's default."""
    momentum_bits: int | None = None
    """diloco: width of the shared momentum. None: the mode's default."""
    share_momentum: bool | None = None
    """diloco: average momenta within the group too. None: the mode's default."""
    block_size: int | None = None
    """Elements per side-information block. None: the mode's default."""
    error_feedback: bool = True
    """ef: carry the rounding error into the next proposal."""
    design: str = "siq"
    """ef: siq (quantized proposals every round) or pull (a codec on the step, the proposal at
    16 bits every ``pull_every`` rounds)."""
    pull_every: int = 8
    """ef pull: rounds from one 16-bit proposal to the next."""
    rotate: int = 1
    """ef siq: each round covers one in ``rotate`` blocks (a ``rotate`` times smaller message)."""
    codec: str = "int4"
    """ef pull: the codec of the step between pulls."""
    clip: bool = True
    """Pairs: clip a partner's message toward ours before the mean (self-centred clipping), so
    one bad partner cannot wreck our weights; clipped partners count toward a ban."""
    clip_factor: float = 2.0
    """A partner may lie at most this many times the median of recent partner distances away."""
    clip_window: int = 16
    """Recent partner distances the median is taken over."""
    clip_initial: float = 0.25
    """The most a partner may lie away (relative distance) until 4 distances are known."""
    clip_violation: float = 4.0
    """A partner beyond this many thresholds counts toward a ban (peers.ban_after_violations).
    Honest partners that took solo rounds under load were measured at up to 4 thresholds."""

    gamma: float | None = None
    """noloco pull toward the partner's phi; None means gamma = beta (only theta is sent)."""
    max_weight_ratio: float = 8.0
    """A group weights its members by the tokens each trained in the round (a node with more
    GPUs counts for more), capped at this many times the group's lightest member."""
    group_size: int = 2
    """Nodes per exchange: pairs for noloco and ef; up to k for diloco (reduce-scatter and
    all-gather over pairwise exchanges)."""
    overlap: bool = True
    """Apply each outer update one phase late so training never waits for the network; False
    blocks training during the outer step (for comparison and exact tests)."""
    match_deadline_s: float = 10.0
    """How long a round looks for a partner before it takes a solo step."""
    exchange_timeout_s: float = 120.0
    """Deadline of one exchange, transfer included."""
    rounds: int = 0
    """Stop after this many rounds; 0 trains until stopped."""

    def __post_init__(self) -> None:
        if self.mode not in ("noloco", "diloco", "ef"):
            raise ConfigError(f"sync.mode must be noloco, diloco or ef, got {self.mode!r}")
        if self.inner_steps < 1:
            raise ConfigError(f"sync.inner_steps must be >= 1, got {self.inner_steps}")
        if self.group_size < 2 or self.group_size > 64:
            raise ConfigError(f"sync.group_size must be in 2..64, got {self.group_size}")
        if self.group_size > 2 and self.mode != "diloco":
            raise ConfigError(
                f"sync.group_size {self.group_size}: groups are for diloco; "
                f"{self.mode} exchanges in pairs"
            )
        if self.match_deadline_s <= 0 or self.exchange_timeout_s <= 0 or self.rounds < 0:
            raise ConfigError("sync deadlines must be > 0 and sync.rounds >= 0")
        rc = self.round_config  # raises ConfigError for a bad combination
        if self.group_size > 2 and rc.bits != 32:
            raise ConfigError(
                "groups of more than 2 average fp32 proposals: set sync.bits = 32 with "
                "sync.group_size > 2"
            )

    @property
    def lr(self) -> float:
        return self.round_config.lr

    @property
    def momentum(self) -> float:
        return self.round_config.momentum

    @property
    def round_config(self) -> RoundConfig:
        """The round's maths: the mode's defaults with this section's overrides."""
        rc = default_round_config(self.mode)
        changes: dict[str, Any] = {
            "lr": self.outer_lr,
            "momentum": self.outer_momentum,
            "gamma": self.gamma,
            "bits": self.bits,
            "momentum_bits": self.momentum_bits,
            "share_momentum": self.share_momentum,
            "block_size": self.block_size,
        }
        changes = {k: v for k, v in changes.items() if v is not None}
        changes |= {
            "clip": self.clip,
            "clip_factor": self.clip_factor,
            "clip_window": self.clip_window,
            "clip_warmup": min(4, self.clip_window),
            "clip_initial": self.clip_initial,
            "clip_violation": self.clip_violation,
            "max_weight_ratio": self.max_weight_ratio,
        }
        if self.mode == "ef":
            changes |= {
                "error_feedback": self.error_feedback,
                "design": self.design,
                "pull_every": self.pull_every,
                "rotate": self.rotate,
                "codec": self.codec,
            }
        return dataclasses.replace(rc, **changes)


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainerConfig:
    """Inner training on this node's accelerator."""

    device: str = "auto"
    """auto (cuda when available), cuda, cuda:N or cpu."""
    inner: InnerConfig = field(default_factory=InnerConfig)
    seed: int = 0
    """Seeds the initial weights (the same on every node of a run) and, with the peer id, data."""
    threads: int | None = None
    """torch CPU threads; None keeps torch's default."""
    nproc_per_node: int = 1
    """Local ranks of this node (``torch.distributed.run``), one per GPU: rank 0 owns the
    network side, every rank trains with DDP on its own data stream."""
    rank_timeout_s: float = 86400.0
    """How long a rank waits for the others in one collective before the node gives up (rank 0
    may wait for peers before the first round; a rank that dies is noticed at once)."""
    eval_every: int = 10
    """Measure the outer weights' validation loss on the task's held-out batches every this
    many rounds (task.val_batches of them; 0 never)."""
    malloc_mmap_threshold: int = 8 * 1024 * 1024
    """glibc: allocations from this many bytes up are mapped and returned to the system when
    freed (a fixed threshold; glibc's own raises itself to 32 MiB); 0 keeps glibc's. Above the
    4 MiB message chunks, so their buffers are reused instead of fresh pages each time."""
    malloc_trim_threshold: int = 32 * 1024 * 1024
    """glibc: free memory at the top of a heap beyond this many bytes goes back to the system
    (0: the mmap threshold). Room for a few chunk buffers between messages."""
    malloc_arena_max: int = 2
    """glibc: at most this many malloc arenas (one per thread by default); 0 keeps glibc's."""

    def __post_init__(self) -> None:
        if self.eval_every < 0:
            raise ConfigError(f"trainer.eval_every must be >= 0, got {self.eval_every}")
        if not 1 <= self.nproc_per_node <= 64:
            raise ConfigError(f"trainer.nproc_per_node must be in 1..64, got {self.nproc_per_node}")
        if not self.rank_timeout_s > 0:
            raise ConfigError(f"trainer.rank_timeout_s must be > 0, got {self.rank_timeout_s}")
        if min(self.malloc_mmap_threshold, self.malloc_trim_threshold, self.malloc_arena_max) < 0:
            raise ConfigError(
                "trainer.malloc_mmap_threshold, trainer.malloc_trim_threshold and "
                "trainer.malloc_arena_max must be >= 0 (0 keeps glibc's setting; a trim "
                "threshold of 0 follows the mmap threshold)"
            )
        if self.malloc_trim_threshold > 1 << 30:
            raise ConfigError(
                f"trainer.malloc_trim_threshold must be at most 1 GiB, got "
                f"{self.malloc_trim_threshold}"
            )
        if self.malloc_arena_max > 1024:
            raise ConfigError(
                f"trainer.malloc_arena_max must be at most 1024, got {self.malloc_arena_max}"
            )
        if self.malloc_mmap_threshold > 32 * 1024 * 1024:
            raise ConfigError(
                f"trainer.malloc_mmap_threshold must be at most 32 MiB (glibc's limit), got "
                f"{self.malloc_mmap_threshold}"
            )
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(
                f"trainer.device must be auto, cpu, cuda or cuda:N, got {self.device!r}"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointConfig:
    """Where and how often the node saves its state."""

    dir: Path | None = None
    """Directory for checkpoints; None disables them."""
    every_rounds: int = 10
    """Save every this many rounds (and on a clean stop)."""
    keep: int = 2
    """Checkpoints kept; older ones are deleted."""

    def __post_init__(self) -> None:
        if self.every_rounds < 1 or self.keep < 1:
            raise ConfigError("checkpoint.every_rounds and checkpoint.keep must be >= 1")


@dataclass(frozen=True, kw_only=True, slots=True)
class DebugConfig:
    """Test and benchmark knobs; empty in production."""

    fault_plan: Path | None = None
    """JSON fault plan (``locoswarm/faultplan.py``) to inject faults through the code's seams."""


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeConfig:
    """Everything one node needs. Sections are owned by their packages."""

    run_id: str = "locoswarm"
    """Swarm name: nodes only pair with nodes of the same run."""
    sync: SyncConfig = field(default_factory=SyncConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    peers: PeersConfig = field(default_factory=PeersConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    announce: str | None = None
    """``host:port`` other nodes dial for gRPC, when it differs from the bound address."""
    metrics_port: int | None = 9310
    """Port of the Prometheus /metrics endpoint; 0 picks a free one; None disables it."""
    metrics_host: str = "0.0.0.0"
    """Address the /metrics endpoint binds."""
    secret_file: Path | None = None
    """File holding the swarm secret (at least 16 bytes); None turns authentication off."""
    ready_file: Path | None = None
    """Write one JSON line with the node's addresses here once it serves (for scripts, tests)."""
    log_every_s: float = 10.0
    """Interval of the console progress line."""
    shutdown_grace_s: float = 30.0
    """How long a stop waits for the exchange in flight and the final checkpoint."""
    debug: DebugConfig = field(default_factory=DebugConfig)

    def __post_init__(self) -> None:
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be in 0..65535, got {self.metrics_port}")


# -- loading ----------------------------------------------------------------------------------


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """``LOCOSWARM_SYNC__MODE=diloco`` -> ``{"sync": {"mode": "diloco"}}``."""
    dotted = {
        name[len(ENV_PREFIX) :].lower().replace("__", "."): value
        for name, value in environ.items()
        if name.startswith(ENV_PREFIX)
    }
    return nest(dotted)


def load_config(
    file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    base: Mapping[str, Any] | None = None,
) -> NodeConfig:
    """Defaults < ``base`` (dotted keys, a preset) < TOML ``file`` < environment < ``overrides``
    (dotted keys, from flags)."""
    data: dict[str, Any] = nest(base or {})
    if file is not None:
        try:
            data = merge(data, tomllib.loads(Path(file).read_text()))
        except OSError as exc:
            raise ConfigError(f"config file {file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file}: {exc}") from None
    data = merge(data, from_env(os.environ if environ is None else environ))
    data = merge(data, nest(overrides or {}))
    return build(NodeConfig, data)  # type: ignore[no-any-return]
