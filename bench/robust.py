"""Bad-peer benchmark: one replica of four sends poisoned weights every round, in every mode.

Usage: python -m bench.robust [--rounds 12] [--inner-steps 10] --json bench/results/robust.json

Runs the simulator (``sync/rounds.py`` and ``sync/robust.py``, the daemon's round) with 4
replicas of the ``tiny`` task (small batches) in each sync mode: a clean swarm, then replica 3
sending 10x-scaled, inverted or noisy (noise RMS = the weights' RMS) weights every round, with
self-centred clipping on and off. Records each honest replica's final validation loss, the
worst honest loss against the clean run's mean, and the clipped tensors. Writes JSON and a PNG
(worst honest loss over the clean mean, log scale). Check: with clipping, every attack keeps
every honest replica within 5% of the clean mean.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import finite, print_checks
from locoswarm.sim.config import SimConfig
from locoswarm.sim.swarm import run_sim
from locoswarm.sync.robust import ATTACKS
from locoswarm.sync.round_config import MODES, RoundConfig, default_round_config
from locoswarm.tasks.task import TaskConfig

TASK = TaskConfig(name="tiny", batch_size=2, seq_len=16, val_batches=2, max_bytes=50_000)
HONEST = 3
"""Replicas 0..2 are honest; replica 3 attacks."""
TOLERANCE = 1.05


def run_one(
    mode: str, attack: str | None, clip: bool, rounds: int, h: int, factor: float
) -> dict[str, Any]:
    rc = replace(default_round_config(mode), clip=clip, clip_factor=factor)  # type: ignore[arg-type]
    cfg = SimConfig(
        strategy=mode,  # type: ignore[arg-type]
        num_replicas=HONEST + 1,
        rounds=rounds,
        inner_steps=h,
        task=TASK,
        sync=rc,
        attack=attack,
        attackers=(HONEST,) if attack else (),
    )
    started = time.perf_counter()
    result = run_sim(cfg)
    return {
        "mode": mode,
        "attack": attack,
        "clip": clip,
        "clip_factor": factor,
        "honest_val_loss": result.val_loss_per_replica[:HONEST],
        "clipped_per_replica": result.clipped_per_replica,
        "wall_s": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.robust", description=__doc__)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--inner-steps", type=int, default=10)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    p.add_argument(
        "--clip-factor", type=float, default=RoundConfig().clip_factor, help="sync.clip_factor"
    )
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--png", type=Path)
    a = p.parse_args(argv)
    runs: list[dict[str, Any]] = []
    checks: dict[str, bool | None] = {}
    for mode in a.modes:
        clean = run_one(mode, None, True, a.rounds, a.inner_steps, a.clip_factor)
        runs.append(clean)
        base = sum(clean["honest_val_loss"]) / HONEST
        clean["worst_over_clean"] = max(clean["honest_val_loss"]) / base
        # What clipping costs an honest swarm: the same clean run without it.
        unclipped = run_one(mode, None, False, a.rounds, a.inner_steps, a.clip_factor)
        runs.append(unclipped)
        unclipped["worst_over_clean"] = max(unclipped["honest_val_loss"]) / base
        unclipped["mean_over_clean"] = sum(unclipped["honest_val_loss"]) / HONEST / base
        print(
            f"{mode} clean: clipping {base:.4f}, without {unclipped['mean_over_clean'] * base:.4f}"
            f" (honest tensors clipped {clean['clipped_per_replica']})",
            file=sys.stderr,
        )
        for attack in a.attacks:
            for clip in (True, False):
                run = run_one(mode, attack, clip, a.rounds, a.inner_steps, a.clip_factor)
                worst = max(run["honest_val_loss"])
                run["worst_over_clean"] = worst / base if math.isfinite(worst) else math.inf
                runs.append(run)
                print(
                    f"{mode} {attack} clip={clip}: worst honest {worst:.4f} "
                    f"({run['worst_over_clean']:.3f}x clean {base:.4f}), "
                    f"clipped {run['clipped_per_replica']}",
                    file=sys.stderr,
                )
                if clip:
                    checks[f"{mode} {attack}: every honest replica within 5% of clean"] = bool(
                        run["worst_over_clean"] <= TOLERANCE
                    )
    out = {
        "header": {
            "replicas": HONEST + 1,
            "attacker": HONEST,
            "rounds": a.rounds,
            "inner_steps": a.inner_steps,
            "clip_factor": a.clip_factor,
            "bans": "none: the simulator has no peer health (the daemon bans a blamed partner)",
            "task": asdict(TASK),
            "attack_factor": SimConfig().attack_factor,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": platform.machine(),
        },
        "runs": runs,
        "checks": checks,
    }
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(finite(out), indent=2) + "\n")
    plot(out, a.png or a.json.with_suffix(".png"))
    print_checks(checks, {})
    return 0


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in out["runs"] if r["attack"] is not None]
    modes = list(dict.fromkeys(r["mode"] for r in runs))
    fig, axes = plt.subplots(1, len(modes), figsize=(4.5 * len(modes), 3.6), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        for clip, color in ((True, "tab:blue"), (False, "tab:red")):
            rows = [r for r in runs if r["mode"] == mode and r["clip"] is clip]
            xs = [ATTACKS.index(r["attack"]) + (-0.18 if clip else 0.18) for r in rows]
            ys = [min(r["worst_over_clean"], 1e6) for r in rows]
            ax.bar(xs, ys, width=0.36, color=color, label="clipping" if clip else "no clipping")
        ax.axhline(TOLERANCE, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xticks(range(len(ATTACKS)), ATTACKS)
        ax.set_title(mode)
        ax.set_ylabel("worst honest loss / clean")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
