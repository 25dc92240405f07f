"""The ``locoswarm`` command line: ``run`` (a node), ``status``, ``demo`` and ``sim``.

Parses arguments into typed config sections, owns the process's signal handling (first SIGINT or
SIGTERM: graceful stop; second: forced exit) and maps errors to exit codes (0 clean, 2 for a
configuration or data error, 1 for anything else, without a traceback for users' mistakes).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from locoswarm.compression.config import CODEC_CHOICES
from locoswarm.errors import CheckpointError, ConfigError, PeerError
from locoswarm.sim.config import STRATEGIES, NetworkModel, SimConfig
from locoswarm.sim.swarm import EvalPoint, run_sim
from locoswarm.sync.round_config import RoundConfig, default_round_config
from locoswarm.tasks.inner import InnerConfig
from locoswarm.tasks.task import TaskConfig

log = logging.getLogger("locoswarm")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def add_sim_arguments(p: argparse.ArgumentParser) -> None:
    """Declares the ``sim`` flags (shared with the benchmarks).

    The round's flags default to None: ``sim_config_from_args`` starts from the daemon's defaults
    for the mode (``default_round_config``) and overrides only what was given.
    """
    p.add_argument("--sync", choices=STRATEGIES, default="noloco", help="strategy (default noloco)")
    p.add_argument("--replicas", type=int, default=8, help="simulated nodes (default 8)")
    p.add_argument("--inner-steps", type=int, default=50, help="H, inner steps per round (50)")
    p.add_argument("--rounds", type=int, default=20, help="outer rounds (default 20)")
    p.add_argument(
        "--task",
        default="tiny",
        help="built-in size tiny|small|base, or your own 'module:function'",
    )
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="PATH",
        help="text file or folder to train on (repeatable; default: Python's stdlib)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step and replica")
    p.add_argument("--seq-len", type=int, default=64, help="bytes per sequence")
    p.add_argument("--val-batches", type=int, default=16)
    p.add_argument(
        "--max-bytes", type=int, default=None, help="cap on training bytes per replica (quick runs)"
    )
    p.add_argument("--lr", type=float, default=1e-3, help="inner AdamW peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=100, help="inner warm-up steps")
    # The round (diloco, noloco, ef): None keeps the daemon's default for the mode.
    p.add_argument(
        "--outer-lr", type=float, default=None, help="outer lr / noloco beta (default 0.7)"
    )
    p.add_argument(
        "--outer-momentum",
        type=float,
        default=None,
        help="Nesterov momentum of diloco and ef (0.8) / noloco alpha (0.5)",
    )
    p.add_argument(
        "--gamma",
        type=float,
        default=None,
        help="noloco: pull toward the group's mean phi (default: = beta, theta-only wire)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="members per group (default 2); 0 = all replicas, the all-reduce reference "
        "(fp32, DiLoCo's momentum 0.9 unless --outer-momentum)",
    )
    p.add_argument(
        "--pairing",
        choices=("random", "hypercube"),
        default=None,
        help="random (the daemon's seeded shuffle, default) or hypercube pairs",
    )
    p.add_argument(
        "--blocking",
        action="store_true",
        help="apply each round's update at once instead of one phase late (the daemon's overlap)",
    )
    p.add_argument(
        "--apply-delay",
        type=int,
        default=None,
        help="overlap: inner steps of the next phase before the update lands (default: the "
        "modelled transfer time in steps, as the daemon applies an update when it arrives)",
    )
    p.add_argument(
        "--bits",
        type=int,
        default=None,
        help="proposal bits per element: 32 (fp32) or 1, 2, 4, 8, 16 side-information "
        "quantization (default: diloco 16, ef 4; groups other than pairs: 32)",
    )
    p.add_argument(
        "--momentum-bits",
        type=int,
        default=None,
        help="diloco: width of the shared momentum, 32 or 1, 2, 4, 8, 16 (default 8)",
    )
    share = p.add_mutually_exclusive_group()
    share.add_argument(
        "--share-momentum",
        dest="share_momentum",
        action="store_const",
        const=True,
        default=None,
        help="diloco: average the momenta within the group too (the default)",
    )
    share.add_argument(
        "--private-momentum",
        dest="share_momentum",
        action="store_const",
        const=False,
        help="diloco: every member keeps its own momentum (one tensor on the wire)",
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="elements per side-information quantization block (diloco 256, ef 64)",
    )
    p.add_argument(
        "--no-error-feedback",
        action="store_true",
        help="ef: drop the rounding error instead of sending it with the next proposal",
    )
    p.add_argument(
        "--design",
        choices=("siq", "pull"),
        default=None,
        help="ef: siq (quantized proposals every round, default) or pull (a codec on the step)",
    )
    p.add_argument(
        "--pull-every",
        type=int,
        default=None,
        help="ef --design pull: a 16-bit proposal every N rounds (default 8)",
    )
    p.add_argument(
        "--rotate",
        type=int,
        default=None,
        help="ef --design siq: each round covers one in N blocks (default 1: all)",
    )
    p.add_argument(
        "--codec",
        choices=CODEC_CHOICES,
        default=None,
        help="ef --design pull: the step's codec (default int4)",
    )
    p.add_argument(
        "--miss-prob",
        type=float,
        default=0.0,
        help="probability a replica misses a round's exchange",
    )
    p.add_argument(
        "--speeds",
        type=_floats,
        default=(),
        help="comma-separated relative speed per replica, e.g. 1,1,0.5,...",
    )
    p.add_argument(
        "--step-time-s", type=float, default=0.1, help="simulated seconds per inner step at speed 1"
    )
    p.add_argument("--latency-s", type=float, default=0.05, help="simulated one-way latency")
    p.add_argument("--bandwidth-mbit", type=float, default=100.0, help="simulated link Mbit/s")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every N rounds")


# Round flags, the modes they mean something for, and the RoundConfig field they set.
_ROUND_FLAGS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("outer_lr", "--outer-lr", ("noloco", "diloco", "ef")),
    ("outer_momentum", "--outer-momentum", ("noloco", "diloco", "ef")),
    ("gamma", "--gamma", ("noloco",)),
    ("bits", "--bits", ("diloco", "ef")),
    ("momentum_bits", "--momentum-bits", ("diloco",)),
    ("share_momentum", "--share-momentum/--private-momentum", ("diloco",)),
    ("block_size", "--block-size", ("diloco", "ef")),
    ("design", "--design", ("ef",)),
    ("pull_every", "--pull-every", ("ef",)),
    ("rotate", "--rotate", ("ef",)),
    ("codec", "--codec", ("ef",)),
    ("group_size", "--group-size", ("noloco", "diloco", "ef")),
    ("pairing", "--pairing", ("noloco", "diloco", "ef")),
    ("apply_delay", "--apply-delay", ("noloco", "diloco", "ef")),
)


def _given(a: argparse.Namespace, dest: str) -> bool:
    return getattr(a, dest) is not None


def round_config_from_args(a: argparse.Namespace) -> RoundConfig | None:
    """The round's maths from the flags: the daemon's defaults for the mode, then every given flag
    (None for ddp and solo). Raises ConfigError for a flag the mode has no use for."""
    mode = a.sync
    for dest, flag, modes in _ROUND_FLAGS:
        if _given(a, dest) and mode not in modes:
            raise ConfigError(f"{flag} applies to {', '.join(modes)} only, not --sync {mode}")
    if a.no_error_feedback and mode != "ef":
        raise ConfigError(f"--no-error-feedback applies to ef only, not --sync {mode}")
    if a.blocking and mode in ("ddp", "solo"):
        raise ConfigError(f"--blocking applies to noloco, diloco, ef only, not --sync {mode}")
    if a.blocking and _given(a, "apply_delay"):
        raise ConfigError("--apply-delay delays an overlapped update: drop it or --blocking")
    if mode in ("ddp", "solo"):
        return None
    design = a.design or "siq"
    if design != "pull" and (_given(a, "pull_every") or _given(a, "codec")):
        raise ConfigError("--pull-every and --codec apply to --design pull only")
    if mode == "ef" and design == "siq" and a.group_size not in (None, 2):
        raise ConfigError("ef --design siq quantizes proposals for pairs: --group-size must be 2")
    rc = default_round_config(mode)
    over: dict[str, Any] = {}
    if _given(a, "outer_lr"):
        over["lr"] = a.outer_lr
    if _given(a, "outer_momentum"):
        over["momentum"] = a.outer_momentum
    if _given(a, "gamma"):
        over["gamma"] = a.gamma
    if mode == "diloco" and a.group_size not in (None, 2):
        # Groups other than pairs average fp32 proposals (the all-reduce reference).
        over["bits"] = over["momentum_bits"] = 32
    if mode == "diloco" and a.group_size == 0 and "momentum" not in over:
        over["momentum"] = 0.9  # the all-reduce reference keeps DiLoCo's own momentum
    for dest, field_name in (
        ("bits", "bits"),
        ("momentum_bits", "momentum_bits"),
        ("share_momentum", "share_momentum"),
        ("block_size", "block_size"),
        ("design", "design"),
        ("pull_every", "pull_every"),
        ("rotate", "rotate"),
        ("codec", "codec"),
    ):
        if _given(a, dest):
            over[field_name] = getattr(a, dest)
    if a.no_error_feedback:
        over["error_feedback"] = False
    rc = replace(rc, **over)
    if _given(a, "momentum_bits") and not rc.share_momentum:
        raise ConfigError("--momentum-bits sets a shared momentum's width: drop --private-momentum")
    return rc


def sim_config_from_args(a: argparse.Namespace) -> SimConfig:
    """Turns parsed ``sim`` flags into a validated ``SimConfig`` (raises ConfigError)."""
    task = TaskConfig(
        name=a.task,
        data=tuple(a.data),
        batch_size=a.batch_size,
        seq_len=a.seq_len,
        val_batches=a.val_batches,
        max_bytes=a.max_bytes,
    )
    return SimConfig(
        strategy=a.sync,
        num_replicas=a.replicas,
        rounds=a.rounds,
        inner_steps=a.inner_steps,
        seed=a.seed,
        task=task,
        inner=InnerConfig(lr=a.lr, warmup_steps=a.warmup_steps),
        sync=round_config_from_args(a),
        group_size=2 if a.group_size is None else a.group_size,
        pairing=a.pairing or "random",
        overlap=not a.blocking,
        apply_delay=a.apply_delay,
        network=NetworkModel(
            step_time_s=a.step_time_s,
            speeds=a.speeds,
            latency_s=a.latency_s,
            bandwidth_bytes_per_s=a.bandwidth_mbit * 1e6 / 8,
        ),
        miss_prob=a.miss_prob,
        eval_every=a.eval_every,
    )


def _print_point(total_rounds: int) -> object:
    def show(p: EvalPoint) -> None:
        print(
            f"round {p.round:4d}/{total_rounds}  step {p.inner_step:6d}  "
            f"train {p.train_loss_mean:.4f}  val {p.val_loss_mean:.4f}  "
            f"val(avg model) {p.val_loss_avg_model:.4f}  spread {p.spread:.2e}  "
            f"sent/replica {p.bytes_sent_mean / 1e6:9.2f} MB",
            file=sys.stderr,
            flush=True,
        )

    return show


def _cmd_sim(a: argparse.Namespace) -> int:
    cfg = sim_config_from_args(a)
    rc = cfg.round_config
    how = ""
    if rc is not None:
        group = "all replicas" if cfg.group_size == 0 else f"groups of {cfg.group_size}"
        wire = "" if rc.mode == "noloco" or rc.design == "pull" else f", {rc.bits}-bit proposals"
        how = f" ({group}, {cfg.pairing}, {'overlapped' if cfg.overlap else 'blocking'}{wire})"
    print(
        f"locoswarm sim: {cfg.strategy}{how}, {cfg.num_replicas} replicas, task {cfg.task.name}, "
        f"H={cfg.h}, {cfg.rounds} rounds ({cfg.total_steps} inner steps)",
        file=sys.stderr,
        flush=True,
    )
    result = run_sim(cfg, _print_point(cfg.rounds))  # type: ignore[arg-type]
    final = result.to_dict()["final"]
    print(
        f"done in {result.wall_s:.1f}s: val loss {final['val_loss_mean']:.4f} "
        f"(averaged model {final['val_loss_avg_model']:.4f}), spread {final['spread']:.2e}, "
        f"{final['bytes_sent_mean'] / 1e6:.1f} MB sent per replica",
        file=sys.stderr,
    )
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result.to_dict(), indent=1))
        print(f"wrote {a.json}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from locoswarm.node.health import add_health_arguments
    from locoswarm.node.run import add_demo_arguments, add_run_arguments, add_status_arguments

    parser = argparse.ArgumentParser(prog="locoswarm", description=__doc__)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_arguments(sub.add_parser("run", help="run a node (joins a swarm with --join)"))
    add_status_arguments(sub.add_parser("status", help="show a running node's status"))
    add_demo_arguments(sub.add_parser("demo", help="a small local swarm on 127.0.0.1"))
    add_health_arguments(sub.add_parser("health", help="exit 0 when a node is SERVING"))
    sim = sub.add_parser("sim", help="simulate a swarm in one process")
    add_sim_arguments(sim)
    sim.add_argument("--json", default=None, metavar="PATH", help="write results as JSON")
    sim.set_defaults(func=_cmd_sim)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``locoswarm`` console script."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"locoswarm: error: {e}", file=sys.stderr)
        return 2
    except (PeerError, CheckpointError) as e:
        print(f"locoswarm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
