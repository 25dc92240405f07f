"""Round CPU benchmark: the CPU seconds of one node's side of a pair round, by phase and mode.

Usage: python -m bench.round_cpu [--numel N] [--rounds R] --json out.json [--png out.png]

Two ``OuterStep``s (the daemon's outer step, the node's default round settings of each mode)
exchange their messages through the wire format (``Received`` from the other's ``Outgoing``, no
sockets) for ``--rounds`` rounds on fp32 vectors of ``--numel`` elements (default: the ``small``
task's 10,622,208 parameters), each round's theta a seeded step away from phi. For one node it
times, in CPU seconds of the process with torch on one thread (what a round's worker thread
gets): ``prepare`` (our message), ``decode`` (checking the partner's message as it arrives) and
``apply`` (clip, the pair's mean, the new state). The first round is left out (no momentum yet);
the figures are the medians of the others. Writes JSON (header, per-mode phases) and a PNG of
stacked bars; prints a table to stderr. No target: it shows what the round's memory savings cost
in CPU (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import finite, source

SMALL_NUMEL = 10_622_208
MODES = ("noloco", "diloco", "ef")
PHASES = ("prepare", "decode", "apply")


def measure(mode: str, numel: int, rounds: int) -> dict[str, float]:
    """Median CPU seconds of each phase of node ``a``'s pair rounds (the first left out)."""
    from locoswarm.node.config import load_config
    from locoswarm.node.outer import OuterStep
    from locoswarm.protocol import Received
    from locoswarm.protocol.frames import payload_bytes

    g = torch.Generator().manual_seed(0)
    phi = torch.randn(numel, generator=g)
    cfg = load_config(None, {"sync.mode": mode}, {})
    a = OuterStep(cfg, phi, peer_id="a", fp="f")
    b = OuterStep(cfg, phi.clone(), peer_id="b", fp="f")
    seen: dict[str, list[float]] = {p: [] for p in PHASES}
    for r in range(rounds):
        theta_a = a.phi - 0.01 * torch.randn(numel, generator=g)
        theta_b = b.phi - 0.01 * torch.randn(numel, generator=g)
        t0 = time.process_time()
        pa = a.prepare(r, theta_a)
        t1 = time.process_time()
        pb = b.prepare(r, theta_b)
        wire_a = Received(pa.outgoing.header, payload_bytes(pa.outgoing.payload))
        wire_b = Received(pb.outgoing.header, payload_bytes(pb.outgoing.payload))
        t2 = time.process_time()
        got = a.decode(wire_b)
        t3 = time.process_time()
        a.apply(pa, got)
        t4 = time.process_time()
        b.apply(pb, b.decode(wire_a))
        if r:
            for phase, s in zip(PHASES, (t1 - t0, t3 - t2, t4 - t3), strict=True):
                seen[phase].append(s)
    return {phase: statistics.median(v) for phase, v in seen.items()}


def _plot(results: dict[str, dict[str, float]], numel: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    bottom = [0.0] * len(results)
    for phase in PHASES:
        values = [results[m][phase] for m in results]
        ax.bar(list(results), values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("CPU seconds per round (one thread)")
    ax.set_title(f"one node's side of a pair round, {numel:,} fp32 elements")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--numel", type=int, default=SMALL_NUMEL)
    p.add_argument("--rounds", type=int, default=5, help="rounds per mode (>= 2)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--png", type=Path, default=None, help="default: the JSON path as .png")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if args.numel < 1 or args.rounds < 2 or any(m not in MODES for m in modes):
        p.error(f"--numel >= 1, --rounds >= 2, --modes from {','.join(MODES)}")
    torch.set_num_threads(1)
    results = {m: measure(m, args.numel, args.rounds) for m in modes}
    print(f"{'mode':8} " + " ".join(f"{ph:>8}" for ph in PHASES) + "    total", file=sys.stderr)
    for m, r in results.items():
        cells = " ".join(f"{r[ph]:8.3f}" for ph in PHASES)
        print(f"{m:8} {cells} {sum(r.values()):8.3f}", file=sys.stderr)
    out: dict[str, Any] = {
        "header": {
            "benchmark": "round_cpu",
            "numel": args.numel,
            "rounds": args.rounds,
            "torch_threads": 1,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": source("locoswarm", "locoswarm"),
        },
        "cpu_s": {m: {**r, "total": sum(r.values())} for m, r in results.items()},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(finite(out), indent=2) + "\n")
    png = args.png or args.json.with_suffix(".png")
    _plot(results, args.numel, png)
    print(f"wrote {args.json} and {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
