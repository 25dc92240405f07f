"""The ``locoswarm`` command line: ``run`` (a node), ``status``, ``swarm``, ``demo`` and ``sim``.

Parses arguments into typed config sections, owns the process's signal handling (first SIGINT or
SIGTERM: graceful stop; second: forced exit) and maps errors to exit codes (0 clean, 2 for a
configuration or data error, 1 for anything else, without a traceback for users' mistakes).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from locoswarm.compression.config import CODEC_CHOICES
from locoswarm.errors import CheckpointError, ConfigError, PeerError
from locoswarm.peers.config import say_default_pairing
from locoswarm.settings import Flag, add_flags, build, flag_values, nest
from locoswarm.sim.config import SimConfig
from locoswarm.sim.swarm import EvalPoint, run_sim
from locoswarm.sync.round_config import (
    MODES,
    WIDTHS,
    Mode,
    RoundConfig,
    default_round_config,
    say_mode_defaults,
)

log = logging.getLogger("locoswarm")


# The round's flags set fields of ``SimConfig.sync`` (a RoundConfig), with the modes each one
# means something for; not given, they keep the daemon's default for the mode.
_ROUND_FLAGS: tuple[tuple[Flag, tuple[Mode, ...]], ...] = (
    (Flag("sync.lr", "--outer-lr", default=say_mode_defaults("lr")), MODES),
    (Flag("sync.momentum", "--outer-momentum", default=say_mode_defaults("momentum")), MODES),
    (Flag("sync.gamma"), ("noloco",)),
    (
        Flag("sync.bits", default=say_mode_defaults("bits", ("diloco", "ef")), choices=WIDTHS),
        ("diloco", "ef"),
    ),
    (
        Flag(
            "sync.momentum_bits",
            default=say_mode_defaults("momentum_bits", ("diloco",)),
            choices=WIDTHS,
        ),
        ("diloco",),
    ),
    (Flag("sync.share_momentum", const=True, group="momentum"), ("diloco",)),
    (
        Flag(
            "sync.share_momentum",
            "--private-momentum",
            const=False,
            group="momentum",
            help="diloco: every member keeps its own momentum (one tensor on the wire)",
        ),
        ("diloco",),
    ),
    (
        Flag("sync.block_size", default=say_mode_defaults("block_size", ("diloco", "ef"))),
        ("diloco", "ef"),
    ),
    (
        Flag(
            "sync.error_feedback",
            "--no-error-feedback",
            const=False,
            help="ef: drop the rounding error instead of sending it with the next proposal",
        ),
        ("ef",),
    ),
    (Flag("sync.design"), ("ef",)),
    (Flag("sync.pull_every"), ("ef",)),
    (Flag("sync.rotate"), ("ef",)),
    (Flag("sync.codec", choices=CODEC_CHOICES), ("ef",)),
)

# Every other ``sim`` flag sets one field of SimConfig.
SIM_FLAGS: tuple[Flag, ...] = (
    Flag("strategy", "--sync"),
    Flag("num_replicas", "--replicas"),
    Flag("inner_steps"),
    Flag("rounds"),
    Flag("task.name", "--task"),
    Flag("task.data", repeat=True, metavar="PATH"),
    Flag("seed"),
    Flag("task.batch_size"),
    Flag("task.seq_len"),
    Flag("task.val_batches"),
    Flag("task.max_bytes"),
    Flag("inner.lr", "--lr"),
    Flag("inner.warmup_steps"),
    Flag("group_size"),
    Flag("pairing", default=say_default_pairing),
    Flag(
        "overlap",
        "--blocking",
        const=False,
        help="apply each round's update at once instead of one phase late (the daemon's overlap)",
    ),
    Flag("apply_delay"),
    Flag("miss_prob"),
    Flag("network.speeds"),
    Flag("network.step_time_s"),
    Flag("network.latency_s"),
    Flag("network.bandwidth_bytes_per_s", "--bandwidth-mbit", scale=1e6 / 8, unit="Mbit/s"),
    Flag("eval_every"),
)


def add_sim_arguments(p: argparse.ArgumentParser) -> None:
    """Declares the ``sim`` flags (shared with the benchmarks), generated from SimConfig's and
    RoundConfig's fields."""
    add_flags(p, SimConfig, SIM_FLAGS)
    add_flags(p, SimConfig, [flag for flag, _ in _ROUND_FLAGS])


def round_config_from_args(a: argparse.Namespace) -> RoundConfig | None:
    """The round's maths from the flags: the daemon's defaults for the mode, then every given flag
    (None for ddp and solo). Raises ConfigError for a flag the mode has no use for."""
    mode = getattr(a, "strategy", SimConfig().strategy)
    for flag, modes in _ROUND_FLAGS:
        if flag.given(a) and mode not in modes:
            raise ConfigError(f"{flag.flag} applies to {', '.join(modes)} only, not --sync {mode}")
    given = flag_values(a, [flag for flag, _ in _ROUND_FLAGS])
    blocking = getattr(a, "overlap", True) is False
    group_size = getattr(a, "group_size", None)
    if mode in ("ddp", "solo"):
        for key in ("overlap", "group_size", "pairing", "apply_delay"):
            flag = next(f for f in SIM_FLAGS if f.key == key)
            if flag.given(a):
                raise ConfigError(f"{flag.flag} applies to {', '.join(MODES)} only, not {mode}")
        return None
    if blocking and hasattr(a, "apply_delay"):
        raise ConfigError("--apply-delay delays an overlapped update: drop it or --blocking")
    over = {key.removeprefix("sync."): value for key, value in given.items()}
    design = over.get("design", "siq")
    if design != "pull" and ("pull_every" in over or "codec" in over):
        raise ConfigError("--pull-every and --codec apply to --design pull only")
    if mode == "ef" and design == "siq" and group_size not in (None, 2):
        raise ConfigError("ef --design siq quantizes proposals for pairs: --group-size must be 2")
    rc = default_round_config(typing.cast(Mode, mode))
    if mode == "diloco" and group_size not in (None, 2):
        # Groups other than pairs average fp32 proposals (the all-reduce reference).
        over = {"bits": 32, "momentum_bits": 32} | over
    if mode == "diloco" and group_size == 0:
        over = {"momentum": 0.9} | over  # the all-reduce reference keeps DiLoCo's own momentum
    rc = replace(rc, **over)
    if "sync.momentum_bits" in given and not rc.share_momentum:
        raise ConfigError("--momentum-bits sets a shared momentum's width: drop --private-momentum")
    return rc


def sim_config_from_args(a: argparse.Namespace) -> SimConfig:
    """Turns parsed ``sim`` flags into a validated ``SimConfig`` (raises ConfigError)."""
    rc = round_config_from_args(a)
    return build(SimConfig, nest(flag_values(a, SIM_FLAGS)) | {"sync": rc})  # type: ignore[no-any-return]


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
        how = f" ({group}, {cfg.schedule}, {'overlapped' if cfg.overlap else 'blocking'}{wire})"
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
    from locoswarm.node.export import add_export_arguments
    from locoswarm.node.health import add_health_arguments
    from locoswarm.node.run import add_demo_arguments, add_run_arguments, add_status_arguments
    from locoswarm.node.top import add_swarm_arguments

    parser = argparse.ArgumentParser(prog="locoswarm", description=__doc__)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_arguments(sub.add_parser("run", help="run a node (joins a swarm with --join)"))
    add_status_arguments(sub.add_parser("status", help="show a running node's status"))
    add_demo_arguments(sub.add_parser("demo", help="a small local swarm on 127.0.0.1"))
    add_health_arguments(sub.add_parser("health", help="exit 0 when a node is SERVING"))
    add_swarm_arguments(
        sub.add_parser("swarm", help="every live peer of a swarm, from the DHT (trains nothing)")
    )
    add_export_arguments(
        sub.add_parser("export", help="merge live nodes' or checkpoints' weights into one file")
    )
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
    args.argv = list(sys.argv[1:] if argv is None else argv)  # a node of several ranks relaunches
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
