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
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from locoswarm.compression.config import CompressionConfig
from locoswarm.sim.config import SimConfig, Strategy
from locoswarm.sync.diloco import DiLoCoConfig
from locoswarm.sync.noloco import NoLoCoConfig
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


SUITES = ("core", "compression", "all")


def method_configs(reg: Regime, seed: int, suite: str = "core") -> dict[str, SimConfig]:
    """The compared methods.

    core: ddp, NoLoCo, heavy-ball DiLoCo at twice NoLoCo's H (the same bytes), Nesterov DiLoCo at
    NoLoCo's H, solo. compression: uncompressed Nesterov DiLoCo at H, the ef mode (pairs) with
    int4 and sign, each with and without EF14, and DiLoCo with int8 + EF14, all at the same H.
    """
    task = TaskConfig(
        name="tiny", batch_size=reg.batch_size, seq_len=reg.seq_len, val_batches=reg.val_batches
    )
    h = reg.noloco_h

    def cfg(strategy: Strategy, inner_steps: int, **kw: Any) -> SimConfig:
        rounds = reg.total_steps // inner_steps
        return SimConfig(
            strategy=strategy,
            num_replicas=reg.replicas,
            rounds=rounds,
            inner_steps=inner_steps,
            seed=seed,
            task=task,
            eval_every=max(1, rounds // reg.evals),
            **kw,
        )

    nesterov = DiLoCoConfig(inner_steps=h, lr=0.7, momentum=0.9, nesterov=True)
    core = {
        "ddp": cfg("ddp", h),
        "noloco": cfg("noloco", h, noloco=NoLoCoConfig(inner_steps=h, alpha=0.5, beta=0.7)),
        "diloco_heavyball_2h": cfg(
            "diloco",
            2 * h,
            diloco=DiLoCoConfig(inner_steps=2 * h, lr=0.7, momentum=0.3, nesterov=False),
        ),
        "diloco_nesterov_h": cfg("diloco", h, diloco=nesterov),
        "solo": cfg("solo", h),
    }
    compression = {"diloco_nesterov_h": core["diloco_nesterov_h"]}
    # ef pairs have no pull between replicas' phi, so plain averaging (lr 1, no momentum):
    # with Nesterov 0.7/0.9 the replicas drifted apart and ended worse than solo.
    pair_average = DiLoCoConfig(inner_steps=h, lr=1.0, momentum=0.0, nesterov=True)
    for codec in ("int4", "sign"):
        for fb in ("ef14", "none"):
            compression[f"ef_{codec}_{fb}"] = cfg(
                "ef",
                h,
                diloco=pair_average,
                compression=CompressionConfig(codec=codec, error_feedback=fb),
            )
    compression["diloco_int8_ef14"] = cfg(
        "diloco", h, diloco=nesterov, compression=CompressionConfig(codec="int8")
    )
    if suite == "core":
        return core
    if suite == "compression":
        return compression
    return {**core, **compression}


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


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Mean final figures per method over seeds, and the issue's target checks."""

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    table = {
        name: {
            "val_loss_mean": mean([r["final"]["val_loss_mean"] for r in rs]),
            "val_loss_avg_model": mean([r["final"]["val_loss_avg_model"] for r in rs]),
            "spread": mean([r["final"]["spread"] for r in rs]),
            "bytes_sent_per_replica": mean([r["final"]["bytes_sent_mean"] for r in rs]),
            "outer_steps": rs[0]["config"]["rounds"] if name not in ("ddp", "solo") else None,
            "inner_steps_per_round": rs[0]["config"]["inner_steps"],
            "wall_s": mean([r["wall_s"] for r in rs]),
        }
        for name, rs in runs.items()
    }
    loss = {k: v["val_loss_mean"] for k, v in table.items()}
    sent = {k: v["bytes_sent_per_replica"] for k, v in table.items()}
    checks: dict[str, bool] = {}
    figures: dict[str, float | None] = {}
    if "ddp" in loss:
        gap = loss["solo"] - loss["ddp"]
        checks |= {
            "ddp < noloco < solo": loss["ddp"] < loss["noloco"] < loss["solo"],
            "ddp < diloco < solo": loss["ddp"] < loss["diloco_heavyball_2h"] < loss["solo"],
            "noloco <= 1.01 x diloco (heavy-ball, 2H)": loss["noloco"]
            <= 1.01 * loss["diloco_heavyball_2h"],
            "noloco closes >= 70% of the solo-ddp gap": gap > 0
            and (loss["solo"] - loss["noloco"]) >= 0.7 * gap,
            "noloco sends >= 25x fewer bytes than ddp": sent["noloco"] * 25 <= sent["ddp"],
        }
        figures |= {
            "gap_closed_by_noloco": (loss["solo"] - loss["noloco"]) / gap if gap else None,
            "gap_closed_by_diloco_heavyball_2h": (loss["solo"] - loss["diloco_heavyball_2h"]) / gap
            if gap
            else None,
            "noloco_over_diloco_heavyball_2h": loss["noloco"] / loss["diloco_heavyball_2h"],
            "ddp_bytes_over_noloco_bytes": sent["ddp"] / sent["noloco"],
            "noloco_bytes_over_diloco_heavyball_2h_bytes": sent["noloco"]
            / sent["diloco_heavyball_2h"],
        }
    if "ef_int4_ef14" in loss:
        ref, ref_sent = loss["diloco_nesterov_h"], sent["diloco_nesterov_h"]
        checks |= {
            "ef int4+EF within 2% of uncompressed diloco": loss["ef_int4_ef14"] <= 1.02 * ref,
            "ef int4+EF sends >= 7x fewer bytes": sent["ef_int4_ef14"] * 7 <= ref_sent,
            "ef sign+EF within 5% of uncompressed diloco": loss["ef_sign_ef14"] <= 1.05 * ref,
            "ef int4 without EF is worse": loss["ef_int4_none"] > loss["ef_int4_ef14"],
            "ef sign without EF is worse": loss["ef_sign_none"] > loss["ef_sign_ef14"],
        }
        for name in (
            "ef_int4_ef14",
            "ef_int4_none",
            "ef_sign_ef14",
            "ef_sign_none",
            "diloco_int8_ef14",
        ):
            figures[f"{name}_over_diloco"] = loss[name] / ref
            figures[f"diloco_bytes_over_{name}_bytes"] = ref_sent / sent[name]
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
        help="core (ddp/noloco/diloco/solo), compression (ef and codecs) or all",
    )
    a = p.parse_args(argv)
    reg = QUICK if a.quick else FULL
    reused: dict[str, list[dict[str, Any]]] = {}
    if a.reuse:
        # Runs of methods whose configuration did not change, taken from an earlier result file.
        earlier = json.loads(Path(a.reuse).read_text())["runs"]
        reused = {k: v for k, v in earlier.items() if k not in a.rerun}
    jobs = [
        (name, cfg)
        for seed in reg.seeds
        for name, cfg in method_configs(reg, seed, a.suite).items()
        if name not in reused
    ]
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
    with ProcessPoolExecutor(max_workers=a.workers, mp_context=ctx) as pool:
        for name, result in pool.map(_run_one, *zip(*jobs, strict=True)):
            runs.setdefault(name, []).append(result)
    summary = summarise(runs)
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
            f"sent {row['bytes_sent_per_replica'] / 1e6:9.2f} MB",
            file=sys.stderr,
        )
    for check, ok in summary["checks"].items():
        print(f"  [{'ok' if ok else 'MISSED'}] {check}", file=sys.stderr)
    print(f"wrote {json_path} and {png} in {out['wall_s']:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
