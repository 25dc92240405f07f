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
from pathlib import Path

import torch

from locoswarm.compression.config import CODEC_CHOICES, FEEDBACK_CHOICES, CompressionConfig
from locoswarm.errors import CheckpointError, ConfigError, PeerError
from locoswarm.sim.config import STRATEGIES, InnerConfig, NetworkModel, SimConfig
from locoswarm.sim.swarm import EvalPoint, run_sim
from locoswarm.sync.diloco import DiLoCoConfig
from locoswarm.sync.noloco import NoLoCoConfig
from locoswarm.tasks.task import TaskConfig

log = logging.getLogger("locoswarm")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def add_sim_arguments(p: argparse.ArgumentParser) -> None:
    """Declares the ``sim`` flags (shared with the benchmarks)."""
    p.add_argument("--sync", choices=STRATEGIES, default="noloco", help="strategy (default noloco)")
    p.add_argument("--replicas", type=int, default=8, help="simulated nodes (default 8)")
    p.add_argument(
        "--inner-steps",
        type=int,
        default=None,
        help="H, inner steps per round (default: noloco 50, diloco 500)",
    )
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
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument(
        "--outer-lr",
        type=float,
        default=None,
        help="DiLoCo lr (0.7) / NoLoCo beta (0.7) / ef outer lr (1.0)",
    )
    p.add_argument(
        "--outer-momentum",
        type=float,
        default=None,
        help="DiLoCo momentum (0.9 Nesterov, 0.3 heavy-ball) / NoLoCo alpha (0.5) / ef (0)",
    )
    p.add_argument(
        "--gamma",
        type=float,
        default=None,
        help="NoLoCo pull toward the group's mean phi (default: = beta)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="NoLoCo group size (default 2) / DiLoCo group size (default: all)",
    )
    p.add_argument(
        "--heavy-ball",
        action="store_true",
        help="DiLoCo with the NoLoCo paper's heavy-ball momentum instead of Nesterov",
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
    p.add_argument(
        "--codec",
        choices=CODEC_CHOICES,
        default="fp32",
        help="payload codec for diloco and ef (default fp32: uncompressed)",
    )
    p.add_argument(
        "--error-feedback",
        choices=FEEDBACK_CHOICES,
        default="ef14",
        help="error feedback around a lossy codec (default ef14)",
    )
    p.add_argument("--eta", type=float, default=0.5, help="EControl's eta")
    p.add_argument("--block-size", type=int, default=4096, help="int8/int4/sign block size")
    p.add_argument("--topk-ratio", type=float, default=0.01, help="share of elements topk keeps")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every N rounds")


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
    # ef averages pseudo-gradients within changing pairs and has no pull between replicas' phi:
    # momentum would amplify their drift (measured: worse than solo), so it defaults to plain
    # averaging (lr 1, no momentum).
    if a.sync == "ef":
        default_lr, default_momentum = 1.0, 0.0
    else:
        default_lr, default_momentum = 0.7, (0.3 if a.heavy_ball else 0.9)
    outer_lr = default_lr if a.outer_lr is None else a.outer_lr
    diloco = DiLoCoConfig(
        lr=outer_lr,
        momentum=default_momentum if a.outer_momentum is None else a.outer_momentum,
        nesterov=not a.heavy_ball,
        group_size=a.group_size,
    )
    noloco = NoLoCoConfig(
        alpha=0.5 if a.outer_momentum is None else a.outer_momentum,
        beta=outer_lr,
        gamma=a.gamma,
        group_size=a.group_size or 2,
    )
    return SimConfig(
        strategy=a.sync,
        num_replicas=a.replicas,
        rounds=a.rounds,
        inner_steps=a.inner_steps,
        seed=a.seed,
        task=task,
        inner=InnerConfig(lr=a.lr, warmup_steps=a.warmup_steps),
        diloco=diloco,
        noloco=noloco,
        miss_prob=a.miss_prob,
        eval_every=a.eval_every,
        compression=CompressionConfig(
            codec=a.codec,
            error_feedback=a.error_feedback,
            eta=a.eta,
            block_size=a.block_size,
            topk_ratio=a.topk_ratio,
        ),
        network=NetworkModel(
            step_time_s=a.step_time_s,
            speeds=a.speeds,
            latency_s=a.latency_s,
            bandwidth_bytes_per_s=a.bandwidth_mbit * 1e6 / 8,
        ),
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
    print(
        f"locoswarm sim: {cfg.strategy}, {cfg.num_replicas} replicas, task {cfg.task.name}, "
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
