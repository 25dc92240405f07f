"""Convergence benchmark: ddp, DiLoCo, NoLoCo and solo on the default task, same seeds and tokens.

Usage: python bench/convergence.py [--quick] --json out/convergence.json [--png out/convergence.png]

Every method trains the same replicas (same initial weights, same data shards, same inner
AdamW schedule, same number of inner steps) and differs only in how replicas synchronise. Methods
run side by side in a pool of worker processes (one torch thread each). Writes JSON with the
regime, every method's curve and final figures, and the target checks; and a PNG with validation
loss against inner steps and against bytes sent, plus the replica spread over time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from locoswarm.sim.config import SimConfig, Strategy
from locoswarm.sync.round_config import default_round_config
from locoswarm.tasks.task import TaskConfig


@dataclass(frozen=True)
class Regime:
    total_steps: int
    noloco_h: int
    replicas: int = 8
    batch_size: int = 8
    seq_len: int = 64
    val_batches: int = 32
    evals: int = 20
    seeds: tuple[int, ...] = (0,)


FULL = Regime(total_steps=3000, noloco_h=15)
QUICK = Regime(total_steps=600, noloco_h=10, replicas=4, val_batches=16, evals=6)


SUITES = ("core", "sweep", "all")


def method_configs(reg: Regime, seed: int, suite: str = "core") -> dict[str, SimConfig]:
    """The compared methods, every sync mode run as the daemon runs it (overlapped, the daemon's
    pairing and defaults) and blocking beside it.

    core: ddp (the ceiling), solo (the floor), all-reduce Nesterov DiLoCo (the reference), and
    noloco, diloco (pairs) and ef (4 bits and 1 bit), each overlapped and blocking. sweep: the
    designs and settings the defaults were chosen from.
    """
    task = TaskConfig(
        name="tiny", batch_size=reg.batch_size, seq_len=reg.seq_len, val_batches=reg.val_batches
    )
    h = reg.noloco_h

    def cfg(strategy: Strategy, **kw: Any) -> SimConfig:
        rounds = reg.total_steps // h
        return SimConfig(
            strategy=strategy,
            num_replicas=reg.replicas,
            rounds=rounds,
            inner_steps=h,
            seed=seed,
            task=task,
            eval_every=max(1, rounds // reg.evals),
            **kw,
        )

    diloco = default_round_config("diloco")
    ef4 = default_round_config("ef")
    low = replace(ef4, rotate=3)  # 4-bit blocks, a third of them per round: ~1.46 bits
    # The diloco defaults before the hypercube at momentum 0.7 was measured best: random pairs at
    # momentum 0.8. The sweep entries measured under them keep them, so their names keep meaning
    # what was measured.
    old = {"pairing": "random", "sync": replace(diloco, momentum=0.8)}
    old_sync = replace(diloco, momentum=0.8)
    # The same for ef: momentum 0.8 before 0.7 was measured best.
    ef_old = replace(ef4, momentum=0.8)
    low_old = replace(ef_old, rotate=3)
    olds: dict[str, dict[str, Any]] = {"diloco": old, "ef": {"sync": ef_old}}
    core = {
        "ddp": cfg("ddp"),
        "solo": cfg("solo"),
        "diloco_allreduce": cfg(  # DiLoCo's own settings: lr 0.7, Nesterov momentum 0.9
            "diloco",
            group_size=0,
            overlap=False,
            sync=replace(diloco, bits=32, momentum_bits=32, momentum=0.9),
        ),
        "noloco": cfg("noloco"),
        "noloco_blocking": cfg("noloco", overlap=False),
        "diloco": cfg("diloco"),
        "diloco_blocking": cfg("diloco", overlap=False),
        "ef_4bit": cfg("ef", sync=ef4),
        "ef_4bit_blocking": cfg("ef", sync=ef4, overlap=False),
        "ef_lowbit": cfg("ef", sync=low),
        "ef_lowbit_blocking": cfg("ef", sync=low, overlap=False),
    }
    sweep = {
        **{
            f"{mode}_delay{d}": cfg(mode, apply_delay=d, **olds.get(mode, {}))
            for mode in ("diloco", "noloco", "ef")
            for d in (1, 5)
        },
        "diloco_random_m0.8": cfg("diloco", **old),
        "diloco_random_m0.8_blocking": cfg("diloco", overlap=False, **old),
        "diloco_hypercube_m0.8": cfg("diloco", pairing="hypercube", sync=old_sync),
        "diloco_hypercube_m0.6": cfg("diloco", sync=replace(diloco, momentum=0.6)),
        "diloco_private_momentum": cfg(
            "diloco", pairing="random", sync=replace(old_sync, share_momentum=False, bits=32)
        ),
        "diloco_momentum16": cfg(
            "diloco", pairing="random", sync=replace(old_sync, momentum_bits=16)
        ),
        "diloco_momentum16_blocking": cfg(
            "diloco", pairing="random", sync=replace(old_sync, momentum_bits=16), overlap=False
        ),
        "diloco_fp32_shared_momentum": cfg(
            "diloco", pairing="random", sync=replace(old_sync, bits=32, momentum_bits=32)
        ),
        "ef_2bit": cfg("ef", sync=replace(ef_old, bits=2)),
        "ef_4bit_no_feedback": cfg("ef", sync=replace(ef_old, error_feedback=False)),
        "ef_pull_int4_k8": cfg(
            "ef", sync=replace(ef_old, design="pull", codec="int4", pull_every=8)
        ),
        "ef_pull_sign_k32": cfg(
            "ef", sync=replace(ef_old, design="pull", codec="sign", pull_every=32)
        ),
        "ef_1bit": cfg("ef", sync=replace(ef_old, bits=1)),
        "ef_lowbit_sweep": cfg("ef", sync=low_old),
        "ef_4bit_blocking_cal": cfg("ef", sync=ef_old, overlap=False),
        "ef_2bit_rotate2": cfg("ef", sync=replace(ef_old, bits=2, rotate=2)),
        "ef_4bit_hypercube": cfg("ef", sync=ef_old, pairing="hypercube"),
        "ef_lowbit_hypercube": cfg("ef", sync=low_old, pairing="hypercube"),
        "diloco_hypercube_m0.8_blocking": cfg(
            "diloco", pairing="hypercube", sync=old_sync, overlap=False
        ),
        "diloco_hypercube_shuffled": cfg("diloco", pairing="hypercube-shuffled", sync=old_sync),
        "ef_lowbit_hypercube_shuffled": cfg("ef", sync=low_old, pairing="hypercube-shuffled"),
        "ef_4bit_hypercube_shuffled": cfg("ef", sync=ef_old, pairing="hypercube-shuffled"),
        "diloco_hypercube_m0.7": cfg(
            "diloco", pairing="hypercube", sync=replace(diloco, momentum=0.7)
        ),
        "diloco_hypercube_m0.75": cfg(
            "diloco", pairing="hypercube", sync=replace(diloco, momentum=0.75)
        ),
        # The shared momentum at 16 bits: exactly one fp32 tensor per round with the proposal.
        "diloco_momentum16_hypercube": cfg("diloco", sync=replace(diloco, momentum_bits=16)),
        # ef at the momentum before 0.7 was measured best (its low-bit spread missed a tenth of
        # solo's).
        "ef_4bit_m0.8": cfg("ef", sync=ef_old),
        "ef_4bit_m0.8_blocking": cfg("ef", sync=ef_old, overlap=False),
        "ef_lowbit_m0.8": cfg("ef", sync=low_old),
        "ef_lowbit_m0.8_blocking": cfg("ef", sync=low_old, overlap=False),
        # The lever past pairs: larger groups average more replicas' proposals (fp32, so more
        # bytes than the pair target allows).
        **{
            f"diloco_group{k}": cfg(
                "diloco", group_size=k, sync=replace(old_sync, bits=32, momentum_bits=32)
            )
            for k in (3, 4)
        },
        # Outer step settings for pairs (the all-reduce reference keeps DiLoCo's 0.7 / 0.9).
        **{
            f"diloco_lr{lr}_m{m}": cfg(
                "diloco", pairing="random", sync=replace(diloco, lr=lr, momentum=m)
            )
            for lr, m in (
                (0.5, 0.9),
                (1.0, 0.9),
                (0.7, 0.8),
                (1.0, 0.8),
                (0.7, 0.95),
                (0.7, 0.7),
                (0.8, 0.8),
            )
        },
        "diloco_allreduce_m0.8": cfg(  # the reference at the pairs' momentum
            "diloco",
            group_size=0,
            overlap=False,
            sync=replace(diloco, bits=32, momentum_bits=32, momentum=0.8),
        ),
        # The defaults before momentum 0.8 was measured best for pairs.
        "diloco_m0.9": cfg("diloco", pairing="random", sync=replace(diloco, momentum=0.9)),
        "ef_4bit_m0.9": cfg("ef", sync=replace(ef_old, momentum=0.9)),
        "ef_lowbit_m0.9": cfg("ef", sync=replace(low_old, momentum=0.9)),
        "diloco_allreduce": core["diloco_allreduce"],
        "diloco": core["diloco"],
        # The siq lattice's reach (margin x the disagreement bound): wider wraps less, rounds
        # coarser (error feedback carries the rounding).
        "ef_4bit": core["ef_4bit"],
        **{f"ef_4bit_margin{m}": cfg("ef", sync=replace(ef_old, margin=float(m))) for m in (3, 4)},
        "ef_lowbit": core["ef_lowbit"],
        "ef_lowbit_margin3": cfg("ef", sync=replace(low_old, margin=3.0)),
    }
    if suite == "core":
        return core
    if suite == "sweep":
        return sweep
    return {**core, **sweep}


def _run_one(name: str, cfg: SimConfig) -> tuple[str, dict[str, Any]]:
    import torch

    from locoswarm.sim.swarm import run_sim

    torch.set_num_threads(1)
    started = time.perf_counter()
    result = run_sim(cfg).to_dict()
    print(
        f"  {name} seed {cfg.seed}: val {result['final']['val_loss_mean']:.4f} "
        f"in {time.perf_counter() - started:.0f}s",
        file=sys.stderr,
        flush=True,
    )
    return name, result


def summarise(runs: dict[str, list[dict[str, Any]]], *, quick: bool = False) -> dict[str, Any]:
    """Mean final figures per method over seeds, ratios to all-reduce DiLoCo, and the issue's
    target checks (every check needs the methods it compares). ``quick``: a short run is too
    short for the targets, so only the orderings are checked."""

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    table = {
        name: {
            "val_loss_mean": mean([r["final"]["val_loss_mean"] for r in rs]),
            "val_loss_avg_model": mean([r["final"]["val_loss_avg_model"] for r in rs]),
            "spread": mean([r["final"]["spread"] for r in rs]),
            "bytes_sent_per_replica": mean([r["final"]["bytes_sent_mean"] for r in rs]),
            "bytes_per_round": mean([r["final"]["bytes_sent_mean"] for r in rs])
            / rs[0]["config"]["rounds"],
            "inner_steps_per_round": rs[0]["config"]["inner_steps"],
            "overlap": rs[0]["config"].get("overlap", False),
            "wall_s": mean([r["wall_s"] for r in rs]),
        }
        for name, rs in runs.items()
    }
    loss = {k: v["val_loss_mean"] for k, v in table.items()}
    spread = {k: v["spread"] for k, v in table.items()}
    per_round = {k: v["bytes_per_round"] for k, v in table.items()}
    params = next(iter(runs.values()))[0]["num_parameters"]
    fp32_tensor = 4.0 * params
    ref = loss.get("diloco_allreduce")
    for name, row in table.items():
        row["over_diloco_allreduce"] = loss[name] / ref if ref else None
        row["fp32_tensors_per_round"] = per_round[name] / fp32_tensor
    checks: dict[str, bool] = {}
    figures: dict[str, float | None] = {}

    def have(*names: str) -> bool:
        return all(n in loss for n in names)

    if quick:
        for n in ("noloco", "diloco", "ef_4bit", "ef_lowbit", "diloco_allreduce"):
            if have(n, "ddp", "solo"):
                checks[f"ddp < {n} < solo"] = loss["ddp"] < loss[n] < loss["solo"]
        if have("diloco", "diloco_allreduce", "solo"):
            margin = loss["solo"] - loss["diloco_allreduce"]
            checks["diloco (pairs) ahead of solo by most of all-reduce's margin"] = (
                loss["solo"] - loss["diloco"] >= 0.5 * margin
            )
        return {"table": table, "checks": checks, "figures": figures}

    if have("diloco", "diloco_allreduce"):
        checks["diloco (pairs) within 1% of all-reduce DiLoCo"] = (
            loss["diloco"] <= 1.01 * loss["diloco_allreduce"]
        )
        checks["diloco sends <= one fp32 tensor per round"] = per_round["diloco"] <= fp32_tensor
    if have("ef_4bit", "diloco_allreduce"):
        checks["ef 4 bits within 3% of all-reduce DiLoCo"] = (
            loss["ef_4bit"] <= 1.03 * loss["diloco_allreduce"]
        )
        checks["ef 4 bits sends >= 7x fewer bytes than fp32"] = (
            7 * per_round["ef_4bit"] <= fp32_tensor
        )
    if have("ef_lowbit", "diloco_allreduce"):
        checks["ef at 1-2 bits within 6% of all-reduce DiLoCo"] = (
            loss["ef_lowbit"] <= 1.06 * loss["diloco_allreduce"]
        )
        checks["ef at 1-2 bits sends >= 20x fewer bytes than fp32"] = (
            20 * per_round["ef_lowbit"] <= fp32_tensor
        )
    if have("ddp", "solo"):
        gap = loss["solo"] - loss["ddp"]
        pair_modes = [n for n in ("noloco", "diloco", "ef_4bit", "ef_lowbit") if n in loss]
        for n in [*pair_modes, "diloco_allreduce"]:
            if n in loss:
                figures[f"gap_closed_by_{n}"] = (loss["solo"] - loss[n]) / gap if gap else None
        if pair_modes:
            best = min(pair_modes, key=lambda n: loss[n])
            figures["best_pair_mode_gap_closed"] = (loss["solo"] - loss[best]) / gap
            checks[f"best pair mode ({best}) closes >= 65% of the solo-ddp gap"] = (
                loss["solo"] - loss[best]
            ) >= 0.65 * gap
        for n in pair_modes:
            checks[f"{n} spread <= solo spread / 10"] = spread[n] <= spread["solo"] / 10
    for n in ("noloco", "diloco", "ef_4bit", "ef_lowbit"):
        if have(n, f"{n}_blocking"):
            figures[f"{n}_overlap_over_blocking"] = loss[n] / loss[f"{n}_blocking"]
            checks[f"{n}: overlapped costs <= 1% over blocking"] = (
                loss[n] <= 1.01 * loss[f"{n}_blocking"]
            )
    for name in table:
        figures[f"{name}_over_diloco_allreduce"] = table[name]["over_diloco_allreduce"]
    return {"table": table, "checks": checks, "figures": figures}


def plot(runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for name, rs in runs.items():
        curve = rs[0]["curve"]
        steps = [p["inner_step"] for p in curve]
        axes[0].plot(steps, [p["val_loss_mean"] for p in curve], label=name)
        if name != "solo":
            axes[1].plot(
                [max(p["bytes_sent_mean"], 1.0) for p in curve],
                [p["val_loss_mean"] for p in curve],
                label=name,
            )
        axes[2].plot(steps, [p["spread"] for p in curve], label=name)
    axes[0].set(
        xlabel="inner steps",
        ylabel="validation loss (mean over replicas, nats/byte)",
        title="loss vs steps",
    )
    axes[1].set(
        xlabel="bytes sent per replica",
        ylabel="validation loss",
        xscale="log",
        title="loss vs bytes sent",
    )
    axes[2].set(
        xlabel="inner steps",
        ylabel="RMS deviation from replica mean",
        title="replica spread",
        yscale="symlog",
    )
    axes[2].set_yscale("symlog", linthresh=1e-4)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short run (< 5 min on 2 cores)")
    p.add_argument("--json", required=True, help="where to write the JSON results")
    p.add_argument("--png", default=None, help="plot path (default: next to the JSON)")
    p.add_argument("--workers", type=int, default=2, help="parallel method runs (1 thread each)")
    p.add_argument(
        "--reuse",
        default=None,
        metavar="JSON",
        help="take runs from an earlier result file instead of running them again",
    )
    p.add_argument(
        "--rerun",
        default=[],
        action="append",
        metavar="METHOD",
        help="with --reuse: run this method again anyway (repeatable)",
    )
    p.add_argument(
        "--suite",
        choices=SUITES,
        default="core",
        help="core (every mode overlapped and blocking, the references) or sweep or all",
    )
    p.add_argument(
        "--only", default=None, help="comma-separated method names to run, in this order"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="override the regime's inner steps (calibration)"
    )
    a = p.parse_args(argv)
    reg = QUICK if a.quick else FULL
    if a.steps:
        reg = replace(reg, total_steps=a.steps)
    reused: dict[str, list[dict[str, Any]]] = {}
    if a.reuse:
        # Runs of methods whose configuration did not change, taken from an earlier result file.
        earlier = json.loads(Path(a.reuse).read_text())["runs"]
        reused = {k: v for k, v in earlier.items() if k not in a.rerun}
    jobs = [
        (name, cfg)
        for seed in reg.seeds
        for name, cfg in method_configs(reg, seed, a.suite).items()
        if name not in reused and (a.only is None or name in a.only.split(","))
    ]
    if a.only is not None:
        order = a.only.split(",")
        jobs.sort(key=lambda job: order.index(job[0]))
    # Start the longest jobs first so the pool drains evenly.
    print(
        f"convergence benchmark ({'quick' if a.quick else 'full'}): {len(jobs)} runs, "
        f"{a.workers} workers",
        file=sys.stderr,
        flush=True,
    )
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = dict(reused)
    ctx = mp.get_context("spawn")
    partial = Path(a.json).with_suffix(".partial.json")
    partial.parent.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=a.workers, mp_context=ctx) as pool:
        # Jobs start in the order given; every finished run is saved at once (a long run that is
        # stopped keeps what it measured: pass the .partial.json to --reuse).
        futures = [pool.submit(_run_one, name, cfg) for name, cfg in jobs]
        for future in as_completed(futures):
            name, result = future.result()
            runs.setdefault(name, []).append(result)
            partial.write_text(json.dumps({"runs": runs}))
    summary = summarise(runs, quick=a.quick)
    out = {
        "regime": {
            **asdict(reg),
            "task": "tiny byte transformer on the Python stdlib sources",
            "inner_optimizer": "AdamW lr 1e-3, betas (0.9, 0.95), wd 0.1, 100 warm-up steps, "
            "cosine to 1e-4, grad clip 1.0",
            "H": {k: v["inner_steps_per_round"] for k, v in summary["table"].items()},
            "metric": "mean of per-replica validation losses (nats/byte)",
            "bytes": "real payload sizes (fp32 unless a codec is named); ddp and diloco as ring "
            "all-reduce 2(n-1)/n x size, noloco theta-only pair swap 1 x size, ef pair swap of "
            "the encoded message",
        },
        **summary,
        "runs": {k: v for k, v in runs.items()},
        "reused_from": a.reuse,
        "wall_s": time.perf_counter() - started,
    }
    json_path = Path(a.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(out, indent=1))
    png = Path(a.png) if a.png else json_path.with_suffix(".png")
    plot(runs, png)
    for name, row in summary["table"].items():
        print(
            f"{name:22s} val {row['val_loss_mean']:.4f}  avg-model "
            f"{row['val_loss_avg_model']:.4f}  spread {row['spread']:.2e}  "
            f"{row['fp32_tensors_per_round']:.3f} fp32/round"
            + (f"  x{row['over_diloco_allreduce']:.4f}" if row["over_diloco_allreduce"] else ""),
            file=sys.stderr,
        )
    for check, ok in summary["checks"].items():
        print(f"  [{'ok' if ok else 'MISSED'}] {check}", file=sys.stderr)
    print(f"wrote {json_path} and {png} in {out['wall_s']:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
