"""GPU benchmark: a task as plain training and as a node of a 2-node swarm on the same device.

Usage: python bench/gpu.py --json bench/results/gpu.json [--png PATH]      (CUDA: the base task)
       python bench/gpu.py --quick --device cpu --json out/gpu.json         (CPU smoke run: tiny)

Defaults (``FULL``): task base, batch 16 x 1024 bytes, plain 200 timed steps after 10, swarm 7
rounds of H=50, nodes' --log-every 1 s, scraped every 0.2 s; ``--budget 520`` seconds for the
whole run (each phase's timeout is cut to leave the later ones their minimum; the JSON is
rewritten after each phase). ``--quick``: task tiny, batch 8 x 64, 40 steps after 3, 4 rounds
of H=25, one torch thread per process, 200 kB of data. ``--device cuda`` without CUDA is a
one-line error (exit 2).

Three phases, one after the other in one run, every process in a session of its own (its CUDA
context and memory are its own) and every process group killed at the end:

1. ``plain_alone``: one plain-training worker (``bench/gpu.py --plain-worker``). It builds the
   task as the daemon does (``torch.manual_seed(seed)``, ``TaskFactory(TaskConfig(...)).build(
   replica=0, num_replicas=1, seed)``) and trains it with the node's own trainer object,
   ``locoswarm.node.trainer.Trainer`` (model moved to the device, ``InnerLoop``: AdamW,
   schedule, clipping; bf16 autocast on CUDA; the batch moved as the node moves it) by calling
   ``Trainer.inner_step()`` in a loop: the exact inner step a node runs, without the daemon (no
   trainer thread, no snapshots, no outer steps, no DHT, gRPC or metrics). ``--warmup`` steps
   first (excluded), then ``--steps`` timed steps; every step ends with ``float(loss)``, so the
   device has finished it when its time is taken. tokens/s = steps * batch * seq_len / the
   seconds from the end of the warm-up to the end of the last step; peak memory is
   ``torch.cuda.max_memory_allocated`` at the end (not reset after warm-up: the peak is what
   matters; ``max_memory_reserved`` beside it).
2. ``plain_concurrent``: two such workers at once on the same device, the fair baseline for two
   nodes that share one device. Each warms up, says so in a file and waits for a start file
   that the benchmark writes once both are ready; tokens/s of each over the window in which
   both were timing steps (from the later start to the earlier end, by their step end times).
3. ``swarm``: two real ``locoswarm run`` daemons on the same device (``--device``, ``--task``,
   ``--batch-size``, ``--seq-len``, ``--host 127.0.0.1 --metrics-port 0 --ready-file F --rounds
   R --inner-steps H --eval-every 0 --seed 0 --set peers.min_peers=1``; the second ``--join``s
   the multiaddr in the first's ready file, and the first holds its first round until the
   second is live, so both train from the start). Their ``/metrics`` are scraped every
   ``poll_s``. Per node:

   - tokens/s (the figure the check uses): ``locoswarm_trainer_tokens_total`` over wall time,
     in the window in which both nodes were past their first round (warm-up: CUDA kernels,
     allocator, the late join) and before either finished its last round (outer step gauge <
     R: the trainer was training throughout). A node moves its counters into Prometheus once
     per ``--log-every`` (and at each round's end), so the times are those of the first
     scrape that saw a new value (at most ``poll_s`` late at both ends); the node's snapshot
     and apply work at round boundaries and any idle wait are inside this figure;
   - ``tokens_per_s_compute_idle``: the same tokens over the compute + idle seconds of the
     window (``locoswarm_trainer_{compute,idle}_seconds_total``), and ``untracked_fraction`` =
     1 - (compute + idle) / wall: the share of the window in neither (snapshots, applies);
   - peak device memory: ``locoswarm_trainer_device_memory_peak_bytes``
     (``torch.cuda.max_memory_allocated`` in the node; 0 on CPU), highest value scraped;
   - outer-step time: ``locoswarm_sync_exchange_seconds`` sum / count of ``result="ok"``
     (matchmaking, which includes waiting for the partner's boundary, transfer and update),
     and over every result beside it;
   - idle fraction: idle / (idle + compute) over the whole run (last scrape) and the window.

Where ``nvidia-smi`` exists it is sampled every few seconds for each process's used device
memory (CUDA context and allocator cache included), reported beside the allocator's peaks.

Checks (never asserted): the swarm's tokens/s lose at most 3% of the concurrent plain
workers' (sum over the two nodes against the sum over the two workers), and a node's peak
device memory is at most 5% above plain training's (largest node against the worker alone).
Writes JSON (rewritten after each phase, ``complete`` false until the end) and a PNG bar chart;
prints a table to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as ``python bench/gpu.py``: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import finite as _finite
from bench.common import print_checks, start_node
from bench.common import source as _source
from bench.common import version as _version
from bench.swarm import (
    NodeRun,
    _by_label,
    _log_summary,
    _poll,
    _sample,
    _stop_all,
    parse_metrics,
)

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]
SEED = 0


@dataclass(frozen=True)
class Mode:
    task: str
    batch_size: int
    seq_len: int
    steps: int
    warmup: int
    rounds: int
    inner_steps: int
    match_deadline_s: float
    log_every_s: float
    poll_s: float
    threads: int | None
    max_bytes: int | None
    plain_timeout_s: float
    swarm_timeout_s: float
    budget_s: float
    """The whole run's wall time: each phase's timeout is cut so that the later ones keep at
    least ``min_phase_s`` and the swarm's stop ``STOP_RESERVE_S``."""
    min_phase_s: float


FULL = Mode(
    task="base",
    batch_size=16,
    seq_len=1024,
    steps=200,
    warmup=10,
    rounds=7,
    inner_steps=50,
    match_deadline_s=10.0,
    log_every_s=1.0,
    poll_s=0.2,
    threads=None,
    max_bytes=None,
    plain_timeout_s=240.0,
    swarm_timeout_s=360.0,
    budget_s=520.0,
    min_phase_s=120.0,
)
"""An H200: 114M parameters, 16 x 1024 tokens per step. Estimated (not measured yet): under
0.1 s per step alone, twice that for each of two sharers; 3-4 minutes in all (each phase starts
its processes: about 10-20 s for a worker, 15-25 s for each node), and never more than the
520 s budget plus the nodes' stop (at most 45 s) and the plot."""
QUICK = Mode(
    task="tiny",
    batch_size=8,
    seq_len=64,
    steps=40,
    warmup=3,
    rounds=4,
    inner_steps=25,
    match_deadline_s=3.0,
    log_every_s=0.2,
    poll_s=0.1,
    threads=1,
    max_bytes=200_000,
    plain_timeout_s=90.0,
    swarm_timeout_s=120.0,
    budget_s=300.0,
    min_phase_s=60.0,
)
"""A smoke run of every part on a CPU: the tiny task, a handful of steps; figures not meaningful."""

WORKERS = 2
WARMUP_ROUNDS = 1
START_TIMEOUT_S = 300.0
"""How long a concurrent worker waits for the start file."""
STOP_RESERVE_S = 45.0
"""After the swarm's timeout: SIGTERM, up to 30 s for the nodes to stop, SIGKILL, the JSON."""
NVSMI_EVERY_S = 2.0
MIN_TIMEOUT_S = 10.0
LOG_TAIL_CHARS = 3000
TOKENS_TARGET = 0.03
MEMORY_TARGET = 0.05
CHECK_TOKENS = f"tokens/s loss <= {TOKENS_TARGET:.0%}"
CHECK_MEMORY = f"GPU memory overhead <= {MEMORY_TARGET:.0%}"


class UsageError(Exception):
    """A one-line error for the command line (no traceback)."""


# ----------------------------------------------------------------------------------------------
# The plain-training worker (``--plain-worker``): its own process, its own CUDA context.


def plain_worker(a: argparse.Namespace) -> int:
    """Train the task without a daemon; print one JSON line (the last line of stdout)."""
    import torch

    from locoswarm.node.trainer import Trainer, pick_device
    from locoswarm.tasks.inner import InnerConfig
    from locoswarm.tasks.task import TaskConfig, TaskFactory

    if a.threads:
        torch.set_num_threads(a.threads)
    device = pick_device(a.device)
    torch.manual_seed(a.seed)  # as the daemon's _build: the same initial weights
    cfg = TaskConfig(name=a.task, batch_size=a.batch_size, seq_len=a.seq_len, max_bytes=a.max_bytes)
    task = TaskFactory(cfg).build(replica=0, num_replicas=1, seed=a.seed)
    trainer = Trainer(
        task,
        InnerConfig(),
        inner_steps=a.inner_steps,
        total_steps=a.warmup + a.steps,
        device=device,
        tokens_per_step=cfg.batch_size * cfg.seq_len,
    )
    cuda = device.type == "cuda"
    for _ in range(a.warmup):
        trainer.inner_step()
    if a.ready_file:
        Path(a.ready_file).write_text(json.dumps({"pid": os.getpid(), "t": time.monotonic()}))
    if a.start_file:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not Path(a.start_file).exists():
            if time.monotonic() > deadline:
                print(f"no start file within {START_TIMEOUT_S:.0f}s", file=sys.stderr)
                return 3
            time.sleep(0.005)
    t0 = time.monotonic()
    ends: list[float] = []
    for _ in range(a.steps):
        trainer.inner_step()  # ends with float(loss): the device has finished the step
        ends.append(time.monotonic())
    if cuda:
        torch.cuda.synchronize(device)
    train_s = ends[-1] - t0 if ends else 0.0
    durations = [b - a_ for a_, b in zip([t0, *ends[:-1]], ends, strict=True)]
    out: dict[str, Any] = {
        "pid": os.getpid(),
        "task": a.task,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor(),
        "device_total_memory_bytes": torch.cuda.get_device_properties(device).total_memory
        if cuda
        else None,
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "tokens_per_step": trainer.tokens_per_step,
        "warmup_steps": a.warmup,
        "steps": a.steps,
        "threads": torch.get_num_threads(),
        "t0": t0,
        "step_ends": ends,
        "train_s": train_s,
        "tokens_per_s": a.steps * trainer.tokens_per_step / train_s if train_s > 0 else None,
        "step_s_median": statistics.median(durations) if durations else None,
        "step_s_max": max(durations) if durations else None,
        "peak_memory_allocated_bytes": torch.cuda.max_memory_allocated(device) if cuda else 0,
        "peak_memory_reserved_bytes": torch.cuda.max_memory_reserved(device) if cuda else 0,
        "final_loss": trainer.stats.last_loss,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }
    print(json.dumps(_finite(out)), flush=True)
    return 0


@dataclass
class Worker:
    name: str
    proc: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    ready: Path
    cmd: list[str]
    started: float
    result: dict[str, Any] | None = None
    error: str | None = None


def _start_worker(
    mode: Mode, a: argparse.Namespace, workdir: Path, name: str, start_file: Path | None
) -> Worker:
    ready = workdir / f"{name}.ready"
    ready.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--plain-worker",
        *_task_args(mode, a),
        "--steps",
        str(mode.steps),
        "--warmup",
        str(mode.warmup),
        "--inner-steps",
        str(mode.inner_steps),
        "--seed",
        str(SEED),
        "--ready-file",
        str(ready),
        *(["--threads", str(mode.threads)] if mode.threads else []),
        *(["--max-bytes", str(mode.max_bytes)] if mode.max_bytes else []),
        *(["--start-file", str(start_file)] if start_file else []),
    ]
    out, err = workdir / f"{name}.out", workdir / f"{name}.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=o, stderr=e, start_new_session=True)
    return Worker(name, proc, out, err, ready, cmd, time.monotonic())


def _finish_worker(w: Worker, deadline: float) -> None:
    try:
        w.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        w.error = "timeout"
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(w.proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        w.proc.wait(timeout=10)
    lines = [ln for ln in w.stdout.read_text(errors="replace").splitlines() if ln.startswith("{")]
    if w.proc.returncode == 0 and lines:
        w.result = json.loads(lines[-1])
    elif w.error is None:
        tail = w.stderr.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        w.error = f"exit {w.proc.returncode}: {tail}"


def run_plain(
    mode: Mode,
    a: argparse.Namespace,
    workdir: Path,
    n: int,
    gpu: GpuProcessMemory,
    timeout_s: float,
) -> dict[str, Any]:
    """``n`` plain workers at once (started together after their warm-up when ``n > 1``)."""
    started = time.monotonic()
    deadline = started + timeout_s
    start_file = workdir / f"plain{n}.start" if n > 1 else None
    if start_file is not None:
        start_file.unlink(missing_ok=True)
    prefix = "alone" if n == 1 else "concurrent"
    workers = [_start_worker(mode, a, workdir, f"{prefix}{i}", start_file) for i in range(n)]
    error: str | None = None
    try:
        if start_file is not None:
            while not all(w.ready.exists() for w in workers):
                if any(w.proc.poll() is not None for w in workers):
                    error = "a worker exited before it was ready"
                    break
                if time.monotonic() > deadline:
                    error = "the workers were not ready in time"
                    break
                gpu.sample()
                time.sleep(0.05)
            start_file.write_text("go\n")
        while any(w.proc.poll() is None for w in workers) and time.monotonic() < deadline:
            gpu.sample()
            time.sleep(0.1)
    finally:
        for w in workers:
            _finish_worker(w, deadline)
    results = [_worker_entry(w, gpu) for w in workers]
    window = _plain_window(workers) if n > 1 else None
    if window is not None:
        for w, entry in zip(workers, results, strict=True):
            entry.update(_plain_rate_in(w, window))
    errors = [f"{w.name}: {w.error}" for w in workers if w.error]
    if errors:
        error = "; ".join(([error] if error else []) + errors)
    rates = [r.get("tokens_per_s_shared") for r in results]
    return {
        "workers": results,
        "window": None if window is None else {"start": window[0], "end": window[1]},
        "window_s": None if window is None else window[1] - window[0],
        "tokens_per_s_sum": sum(rates) if n > 1 and all(rates) else None,
        "error": error,
        "wall_s": time.monotonic() - started,
    }


def _worker_entry(w: Worker, gpu: GpuProcessMemory) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": w.name,
        "pid": w.proc.pid,
        "exit_code": w.proc.returncode,
        "error": w.error,
        "process_wall_s": time.monotonic() - w.started,
        "gpu_process_memory_bytes": gpu.peak([w.proc.pid]),
    }
    if w.result is not None:
        entry.update({k: v for k, v in w.result.items() if k != "step_ends"})
    return entry


def _plain_window(workers: list[Worker]) -> tuple[float, float] | None:
    """From the later start to the earlier end of the workers' timed steps."""
    spans = [
        (w.result["t0"], w.result["step_ends"][-1])
        for w in workers
        if w.result and w.result.get("step_ends")
    ]
    if len(spans) < len(workers):
        return None
    start, end = max(s for s, _ in spans), min(e for _, e in spans)
    return (start, end) if end > start else None


def _plain_rate_in(w: Worker, window: tuple[float, float]) -> dict[str, Any]:
    """tokens/s of a worker from its first to its last step end inside ``window``."""
    assert w.result is not None
    inside = [t for t in w.result["step_ends"] if window[0] <= t <= window[1]]
    if len(inside) < 2 or inside[-1] <= inside[0]:
        return {"tokens_per_s_shared": None, "shared_steps": len(inside)}
    tokens = (len(inside) - 1) * w.result["tokens_per_step"]
    return {
        "tokens_per_s_shared": tokens / (inside[-1] - inside[0]),
        "shared_steps": len(inside) - 1,
        "shared_s": inside[-1] - inside[0],
    }


# ----------------------------------------------------------------------------------------------
# Per-process device memory from nvidia-smi (CUDA context and allocator cache included).


@dataclass
class GpuProcessMemory:
    enabled: bool
    every_s: float = NVSMI_EVERY_S
    peaks: dict[int, int] = field(default_factory=dict)
    last: float = -math.inf
    samples: int = 0

    @classmethod
    def for_device(cls, device: str) -> GpuProcessMemory:
        return cls(enabled=device.startswith("cuda") and shutil.which("nvidia-smi") is not None)

    def sample(self, force: bool = False) -> None:
        if not self.enabled or (not force and time.monotonic() - self.last < self.every_s):
            return
        self.last = time.monotonic()
        try:
            done = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-compute-apps=pid,used_memory",
                    "--format=csv,noheader,nounits",
                ],
                capture_output=True,
                text=True,
                timeout=10,
            )
        except (OSError, subprocess.SubprocessError):
            return
        if done.returncode != 0:
            return
        for pid, used in parse_compute_apps(done.stdout).items():
            self.peaks[pid] = max(self.peaks.get(pid, 0), used)
        self.samples += 1

    def peak(self, pids: list[int]) -> int | None:
        """The largest used memory seen for any of ``pids`` (None when never seen)."""
        seen = [self.peaks[p] for p in pids if p in self.peaks]
        return max(seen) if seen else None


def parse_compute_apps(text: str) -> dict[int, int]:
    """``nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits`` ->
    {pid: bytes}; lines that do not parse (``[N/A]``) are skipped."""
    out: dict[int, int] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2:
            continue
        with contextlib.suppress(ValueError):
            out[int(parts[0])] = int(float(parts[1]) * 2**20)
    return out


def _nvidia_smi_info() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,memory.total,driver_version,mig.mode.current",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return done.stdout.strip() or done.stderr.strip()
    return None


# ----------------------------------------------------------------------------------------------
# The swarm: two real daemons on the same device.


@dataclass(frozen=True)
class Sample:
    t: float
    tokens: float
    steps: float
    compute_s: float
    idle_s: float
    outer_step: float
    device_memory_peak: float


def _sample_of(text: str, t: float) -> Sample:
    s = parse_metrics(text)
    return Sample(
        t=t,
        tokens=_sample(s, "locoswarm_trainer_tokens_total") or 0.0,
        steps=_sample(s, "locoswarm_trainer_inner_steps_total") or 0.0,
        compute_s=_sample(s, "locoswarm_trainer_compute_seconds_total") or 0.0,
        idle_s=_sample(s, "locoswarm_trainer_idle_seconds_total") or 0.0,
        outer_step=_sample(s, "locoswarm_sync_outer_step") or 0.0,
        device_memory_peak=_sample(s, "locoswarm_trainer_device_memory_peak_bytes") or 0.0,
    )


def _task_args(mode: Mode, a: argparse.Namespace) -> list[str]:
    """What plain workers and nodes train, the same for both."""
    return [
        "--device",
        a.device,
        "--task",
        mode.task,
        "--batch-size",
        str(mode.batch_size),
        "--seq-len",
        str(mode.seq_len),
    ]


def _node_args(mode: Mode, a: argparse.Namespace) -> list[str]:
    return [
        "--run-id",
        "bench-gpu",
        "--host",
        HOST,
        "--metrics-port",
        "0",
        *_task_args(mode, a),
        "--rounds",
        str(mode.rounds),
        "--inner-steps",
        str(mode.inner_steps),
        "--match-deadline",
        f"{mode.match_deadline_s:g}",
        "--log-every",
        f"{mode.log_every_s:g}",
        "--seed",
        str(SEED),
        "--eval-every",
        "0",
        "--set",
        "peers.min_peers=1",
        *(["--threads", str(mode.threads)] if mode.threads else []),
        *(["--max-bytes", str(mode.max_bytes)] if mode.max_bytes else []),
    ]


def _start_node(
    mode: Mode, a: argparse.Namespace, workdir: Path, i: int, join: str | None
) -> NodeRun:
    name = f"node{i}"
    log, ready = workdir / f"{name}.log", workdir / f"{name}.json"
    proc, cmd = start_node(_node_args(mode, a), log=log, ready=ready, join=join, cwd=ROOT)
    return NodeRun(name, proc, log, ready, cmd, time.monotonic())


def run_swarm(
    mode: Mode, a: argparse.Namespace, workdir: Path, gpu: GpuProcessMemory, timeout_s: float
) -> dict[str, Any]:
    """Start node0, then node1 joining it; scrape both until they stop; kill every group."""
    started = time.monotonic()
    nodes: list[NodeRun] = []
    history: dict[str, list[Sample]] = {}
    error: str | None = None
    leftovers: list[int] = []

    def poll() -> None:
        _poll(nodes)
        gpu.sample()
        for n in nodes:
            seen = history.setdefault(n.name, [])
            text, at = n.metrics_text, n.metrics_at
            if text is not None and at is not None and (not seen or seen[-1].t != at):
                seen.append(_sample_of(text, at))

    try:
        first = _start_node(mode, a, workdir, 0, None)
        nodes.append(first)
        deadline = started + timeout_s
        while first.info is None:
            if first.proc.poll() is not None:
                raise RuntimeError(f"node0 exited {first.proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise RuntimeError(f"node0 not ready within {timeout_s:.0f}s")
            time.sleep(0.1)
            poll()
        maddrs = [str(m) for m in first.info.get("maddrs") or []]
        if not maddrs:
            raise RuntimeError(f"node0's ready file has no maddrs: {first.info}")
        nodes.append(_start_node(mode, a, workdir, 1, maddrs[0]))
        while any(n.proc.poll() is None for n in nodes):
            if time.monotonic() > deadline:
                error = f"timeout: nodes still running after {timeout_s:.0f}s"
                break
            t0 = time.monotonic()
            poll()
            time.sleep(max(0.0, mode.poll_s - (time.monotonic() - t0)))
        poll()
    except Exception as exc:  # noqa: BLE001 - recorded; the benchmark carries on
        error = f"{type(exc).__name__}: {exc}"
    finally:
        leftovers = _stop_all(nodes)
    if leftovers:
        error = (error + "; " if error else "") + f"processes left after the kill: {leftovers}"
    window = swarm_window([history.get(n.name, []) for n in nodes], mode.rounds)
    results = [_node_result(n, history.get(n.name, []), window, mode, gpu) for n in nodes]
    rates = [r["tokens_per_s"] for r in results]
    return {
        "command": nodes[0].cmd if nodes else None,
        "error": error,
        "leftover_pids": leftovers,
        "window": None if window is None else {"start": window[0], "end": window[1]},
        "window_s": None if window is None else window[1] - window[0],
        "nodes": results,
        "tokens_per_s_sum": sum(rates) if len(rates) == 2 and all(rates) else None,
        "wall_s": time.monotonic() - started,
    }


def swarm_window(histories: list[list[Sample]], rounds: int) -> tuple[float, float] | None:
    """From the first scrape at which every node was past its warm-up round(s) to the last at
    which none had finished its last round; None when empty."""
    starts, ends = [], []
    for h in histories:
        past = [s.t for s in h if s.outer_step >= WARMUP_ROUNDS]
        before = [s.t for s in h if s.outer_step < rounds]
        if not past or not before:
            return None
        starts.append(past[0])
        ends.append(before[-1])
    if not starts:
        return None
    start, end = max(starts), min(ends)
    return (start, end) if end > start else None


def change_points(history: list[Sample], window: tuple[float, float]) -> list[Sample]:
    """The samples in ``window`` that first showed a new token count (a counter update)."""
    out: list[Sample] = []
    prev: Sample | None = None
    for s in history:
        if (prev is None or s.tokens != prev.tokens) and window[0] <= s.t <= window[1]:
            out.append(s)
        prev = s
    return out


def window_rates(history: list[Sample], window: tuple[float, float] | None) -> dict[str, Any]:
    """tokens/s over wall time and over compute + idle seconds between the first and the last
    counter update inside ``window``."""
    empty: dict[str, Any] = {
        "tokens_per_s": None,
        "tokens_per_s_compute_idle": None,
        "untracked_fraction": None,
        "idle_fraction_window": None,
        "window_updates": 0,
        "window_tokens": None,
        "window_s": None,
    }
    if window is None:
        return empty
    points = change_points(history, window)
    if len(points) < 2 or points[-1].t <= points[0].t:
        return {**empty, "window_updates": len(points)}
    a, b = points[0], points[-1]
    wall = b.t - a.t
    tokens = b.tokens - a.tokens
    busy = (b.compute_s - a.compute_s) + (b.idle_s - a.idle_s)
    return {
        "tokens_per_s": tokens / wall,
        "tokens_per_s_compute_idle": tokens / busy if busy > 0 else None,
        "untracked_fraction": 1 - busy / wall,
        "idle_fraction_window": (b.idle_s - a.idle_s) / busy if busy > 0 else None,
        "window_updates": len(points),
        "window_tokens": tokens,
        "window_steps": b.steps - a.steps,
        "window_s": wall,
    }


def _node_result(
    node: NodeRun,
    history: list[Sample],
    window: tuple[float, float] | None,
    mode: Mode,
    gpu: GpuProcessMemory,
) -> dict[str, Any]:
    text = node.text()
    log = _log_summary(text)
    final = parse_metrics(node.metrics_text) if node.metrics_text else []
    compute = _sample(final, "locoswarm_trainer_compute_seconds_total") or 0.0
    idle = _sample(final, "locoswarm_trainer_idle_seconds_total") or 0.0
    tokens = _sample(final, "locoswarm_trainer_tokens_total") or 0.0
    sums = _by_label(final, "locoswarm_sync_exchange_seconds_sum", "result")
    counts = _by_label(final, "locoswarm_sync_exchange_seconds_count", "result")
    ok_n, all_n = counts.get("ok", 0.0), sum(counts.values())
    pids = sorted({node.pid, *node.memory})
    out: dict[str, Any] = {
        "name": node.name,
        "role": "first" if node.name == "node0" else "joiner",
        "pid": node.pid,
        "exit_code": node.proc.returncode,
        "ready_s": node.ready_s,
        "device": (node.info or {}).get("device"),
        "parameters": (node.info or {}).get("parameters"),
        "scrapes": node.scrapes,
        "scrape_errors": node.scrape_errors,
        "samples": len(history),
        **window_rates(history, window),
        "tokens_per_s_whole_run_compute_idle": tokens / (compute + idle)
        if compute + idle > 0
        else None,
        "idle_fraction": idle / (idle + compute) if idle + compute > 0 else None,
        "compute_s": compute,
        "idle_s": idle,
        "inner_steps": _sample(final, "locoswarm_trainer_inner_steps_total"),
        "outer_steps": _sample(final, "locoswarm_sync_outer_step"),
        "exchanges": _by_label(final, "locoswarm_sync_exchanges_total", "result"),
        "outer_step_s": sums.get("ok", 0.0) / ok_n if ok_n else None,
        "outer_step_s_all": sum(sums.values()) / all_n if all_n else None,
        "device_memory_peak_bytes": max((s.device_memory_peak for s in history), default=None),
        "gpu_process_memory_bytes": gpu.peak(pids),
        "host_vmhwm_bytes": node.memory.get(node.pid, {}).get("vmhwm_bytes"),
        "final_loss": log["final_loss"],
        "log": {
            k: log[k]
            for k in (
                "rounds_done",
                "rounds_exchanged",
                "rounds_solo",
                "solo_reasons",
                "exchanged_round_s_median",
                "late_join_round",
                "finished",
                "warnings",
                "errors",
                "traceback",
            )
        },
    }
    if node.proc.returncode not in (0, None) or log["traceback"] or not log["finished"]:
        out["log_tail"] = text[-LOG_TAIL_CHARS:]
    return out


# ----------------------------------------------------------------------------------------------
# Summary, checks, plot, table


def summarise(plain: dict[str, Any], conc: dict[str, Any], swarm: dict[str, Any]) -> dict[str, Any]:
    alone = (plain.get("workers") or [{}])[0]
    workers = conc.get("workers") or []
    nodes = swarm.get("nodes") or []
    alone_rate = alone.get("tokens_per_s")
    conc_sum = conc.get("tokens_per_s_sum")
    node_rates = [n.get("tokens_per_s") for n in nodes]
    swarm_sum = swarm.get("tokens_per_s_sum")
    per_worker = conc_sum / len(workers) if conc_sum and workers else None
    plain_mem = alone.get("peak_memory_allocated_bytes")
    node_mems = [n.get("device_memory_peak_bytes") for n in nodes]
    node_mem = max((m for m in node_mems if m is not None), default=None)
    outer = [n["outer_step_s"] for n in nodes if n.get("outer_step_s") is not None]
    idle = [n["idle_fraction"] for n in nodes if n.get("idle_fraction") is not None]
    summary = {
        "plain_alone_tokens_per_s": alone_rate,
        "plain_concurrent_tokens_per_s": [w.get("tokens_per_s_shared") for w in workers],
        "plain_concurrent_tokens_per_s_sum": conc_sum,
        "swarm_tokens_per_s": node_rates,
        "swarm_tokens_per_s_sum": swarm_sum,
        "tokens_per_s_loss_vs_concurrent": 1 - swarm_sum / conc_sum
        if swarm_sum and conc_sum
        else None,
        "tokens_per_s_loss_vs_concurrent_worst_node": 1 - min(node_rates) / per_worker
        if per_worker and node_rates and all(node_rates)
        else None,
        "swarm_share_of_plain_alone": swarm_sum / alone_rate if swarm_sum and alone_rate else None,
        "concurrent_share_of_plain_alone": conc_sum / alone_rate
        if conc_sum and alone_rate
        else None,
        "plain_peak_memory_allocated_bytes": plain_mem,
        "plain_concurrent_peak_memory_allocated_bytes": [
            w.get("peak_memory_allocated_bytes") for w in workers
        ],
        "node_device_memory_peak_bytes": node_mems,
        "memory_overhead": node_mem / plain_mem - 1 if node_mem and plain_mem else None,
        "outer_step_s": outer,
        "outer_step_s_mean": statistics.fmean(outer) if outer else None,
        "idle_fraction": idle,
        "idle_fraction_max": max(idle) if idle else None,
    }
    loss = summary["tokens_per_s_loss_vs_concurrent"]
    overhead = summary["memory_overhead"]
    checks: dict[str, bool | None] = {
        CHECK_TOKENS: None if loss is None else loss <= TOKENS_TARGET,
        CHECK_MEMORY: None if overhead is None else overhead <= MEMORY_TARGET,
    }
    values = {
        CHECK_TOKENS: {
            "loss_vs_concurrent": loss,
            "worst_node_loss_vs_concurrent_worker": summary[
                "tokens_per_s_loss_vs_concurrent_worst_node"
            ],
            "swarm_tokens_per_s_sum": swarm_sum,
            "plain_concurrent_tokens_per_s_sum": conc_sum,
            "plain_alone_tokens_per_s": alone_rate,
            "swarm_share_of_plain_alone": summary["swarm_share_of_plain_alone"],
        },
        CHECK_MEMORY: {
            "overhead": overhead,
            "node_peak_bytes": node_mem,
            "plain_peak_bytes": plain_mem,
        },
    }
    notes = {
        CHECK_TOKENS: "1 - (sum of the two nodes' tokens/s) / (sum of two plain workers' tokens/s "
        "run concurrently on the same device); both over wall time"
        if loss is not None
        else "a figure is missing (a worker or node failed, or no measurement window)",
        CHECK_MEMORY: "largest node's torch.cuda.max_memory_allocated / the plain worker's "
        "(alone) - 1"
        if overhead is not None
        else "no device memory figure (0 on CPU, or a worker or node failed)",
    }
    return {"summary": summary, "checks": checks, "check_values": values, "check_notes": notes}


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = out["summary"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    labels = ["plain\nalone"]
    rates = [s["plain_alone_tokens_per_s"]]
    colors = ["tab:gray"]
    for i, r in enumerate(s["plain_concurrent_tokens_per_s"]):
        labels.append(f"plain conc.\nworker {i}")
        rates.append(r)
        colors.append("silver")
    labels.append("plain conc.\nsum")
    rates.append(s["plain_concurrent_tokens_per_s_sum"])
    colors.append("tab:gray")
    for i, r in enumerate(s["swarm_tokens_per_s"]):
        labels.append(f"swarm\nnode{i}")
        rates.append(r)
        colors.append("lightsteelblue")
    labels.append("swarm\nsum")
    rates.append(s["swarm_tokens_per_s_sum"])
    colors.append("tab:blue")
    _bars(axes[0], labels, [r or 0.0 for r in rates], colors, "{:,.0f}")
    loss = s["tokens_per_s_loss_vs_concurrent"]
    axes[0].set(
        ylabel="tokens/s (wall time)",
        title="throughput"
        + (f": swarm loses {loss:.1%} vs concurrent plain" if loss is not None else ""),
    )

    labels, mems, colors = ["plain\nalone"], [s["plain_peak_memory_allocated_bytes"]], ["tab:gray"]
    for i, m in enumerate(s["plain_concurrent_peak_memory_allocated_bytes"]):
        labels.append(f"plain conc.\nworker {i}")
        mems.append(m)
        colors.append("silver")
    for i, m in enumerate(s["node_device_memory_peak_bytes"]):
        labels.append(f"swarm\nnode{i}")
        mems.append(m)
        colors.append("tab:blue")
    _bars(axes[1], labels, [(m or 0) / 2**30 for m in mems], colors, "{:.2f}")
    over = s["memory_overhead"]
    axes[1].set(
        ylabel="GiB",
        title="peak device memory (max_memory_allocated)"
        + (f": {over:+.1%}" if over is not None else "")
        + ("" if any(mems) else "\n(none: 0 on CPU)"),
    )

    nodes = out["swarm"].get("nodes") or []
    labels = [n["name"] for n in nodes]
    idle = [n.get("idle_fraction") or 0.0 for n in nodes]
    _bars(axes[2], labels, idle, ["tab:orange"] * len(nodes), "{:.1%}")
    for i, n in enumerate(nodes):
        t = n.get("outer_step_s")
        axes[2].annotate(
            f"outer step {t:.2f}s" if t is not None else "outer step n/a",
            (i, 0),
            textcoords="offset points",
            xytext=(0, 14),
            ha="center",
            fontsize=8,
        )
    axes[2].set(ylabel="idle / (idle + compute)", title="node idle fraction and outer-step time")
    axes[2].set_ylim(0, max([*idle, 0.05]) * 1.4)
    h = out["header"]
    fig.suptitle(
        f"{h['task']} ({_f(h['parameters'], ',')} parameters) on "
        f"{h['device_name'] or h['device']}: "
        f"batch {h['settings']['batch_size']} x {h['settings']['seq_len']}, "
        f"{h['settings']['rounds']} rounds of H={h['settings']['inner_steps']}"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(ax: Any, labels: list[str], values: list[float], colors: list[str], fmt: str) -> None:
    ax.bar(range(len(values)), values, color=colors)
    for i, v in enumerate(values):
        ax.annotate(fmt.format(v), (i, v), textcoords="offset points", xytext=(0, 2), ha="center")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.grid(alpha=0.3, axis="y")


def _f(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(out: dict[str, Any]) -> None:
    err = sys.stderr
    print(f"{'run':22s} {'tokens/s':>12s} {'peak GiB':>9s} {'idle':>7s} {'outer s':>8s}", file=err)
    phases = {**out["baselines"], "swarm": out["swarm"]}
    for phase in ("plain_alone", "plain_concurrent"):
        for w in phases[phase].get("workers") or []:
            rate = w.get("tokens_per_s_shared") or w.get("tokens_per_s")
            mem = (w.get("peak_memory_allocated_bytes") or 0) / 2**30
            print(f"{w['name']:22s} {_f(rate, '12,.0f')} {mem:9.2f}", file=err)
    for n in out["swarm"].get("nodes") or []:
        mem = (n.get("device_memory_peak_bytes") or 0) / 2**30
        print(
            f"{'swarm ' + n['name']:22s} {_f(n.get('tokens_per_s'), '12,.0f')} {mem:9.2f} "
            f"{_f(n.get('idle_fraction'), '7.1%')} {_f(n.get('outer_step_s'), '8.2f')}",
            file=err,
        )
    for phase, result in phases.items():
        if result.get("error"):
            print(f"{phase} ERROR {str(result['error'])[:300]}", file=err)
    err.flush()
    print_checks(out["checks"], out["check_notes"])


# ----------------------------------------------------------------------------------------------


def check_device(device: str) -> None:
    """Raise UsageError when a CUDA device is asked for and there is none."""
    if not device.startswith("cuda"):
        if device != "cpu":
            raise UsageError(f"--device must be cuda, cuda:N or cpu, got {device!r}")
        return
    import torch

    if not torch.cuda.is_available():
        built = torch.version.cuda or "none (a CPU-only build)"
        raise UsageError(
            f"--device {device}: CUDA is not available (torch {torch.__version__}, CUDA build "
            f"{built}); run on a CUDA machine, or smoke-test with --quick --device cpu"
        )
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")


def _mode(a: argparse.Namespace) -> Mode:
    base = QUICK if a.quick else FULL
    given = {
        "task": a.task,
        "batch_size": a.batch_size,
        "seq_len": a.seq_len,
        "steps": a.steps,
        "warmup": a.warmup,
        "rounds": a.rounds,
        "inner_steps": a.inner_steps,
    }
    return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--json", default=None, help="where to write the JSON results (required)")
    p.add_argument("--png", default=None, help="bar chart path (default: the JSON path, .png)")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny task, few steps")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--task", default=None, help=f"task (default {FULL.task}; --quick {QUICK.task})")
    p.add_argument("--steps", type=int, default=None, help=f"timed plain steps ({FULL.steps})")
    p.add_argument("--warmup", type=int, default=None, help=f"plain warm-up steps ({FULL.warmup})")
    p.add_argument("--rounds", type=int, default=None, help=f"swarm rounds ({FULL.rounds})")
    p.add_argument(
        "--inner-steps", type=int, default=None, help=f"H of the swarm ({FULL.inner_steps})"
    )
    p.add_argument("--batch-size", type=int, default=None, help=f"({FULL.batch_size})")
    p.add_argument("--seq-len", type=int, default=None, help=f"({FULL.seq_len})")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"seconds for the whole run; phases are cut to fit ({FULL.budget_s:g}; "
        f"--quick {QUICK.budget_s:g})",
    )
    p.add_argument("--log-dir", default=None, help="keep the logs here (default: temp)")
    p.add_argument("--note", default=None, help="free text kept in the JSON header")
    # The plain-training worker, started by the benchmark itself.
    p.add_argument("--plain-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--max-bytes", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=SEED, help=argparse.SUPPRESS)
    p.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--start-file", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.plain_worker:
        return plain_worker(a)
    if a.json is None:
        p.error("--json is required")
    mode = _mode(a)
    if min(mode.steps, mode.rounds, mode.inner_steps, mode.batch_size, mode.seq_len) < 1:
        p.error("--steps, --rounds, --inner-steps, --batch-size and --seq-len must be >= 1")
    if mode.rounds <= WARMUP_ROUNDS:
        p.error(f"--rounds must be > {WARMUP_ROUNDS} (the first round is warm-up)")
    try:
        check_device(a.device)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    json_path = Path(a.json)
    png = Path(a.png) if a.png else json_path.with_suffix(".png")
    started = time.perf_counter()
    print(
        f"gpu benchmark ({'quick' if a.quick else 'full'}): task {mode.task} on {a.device}, "
        f"batch {mode.batch_size} x {mode.seq_len}; plain {mode.steps} steps after "
        f"{mode.warmup}; swarm 2 nodes x {mode.rounds} rounds x {mode.inner_steps} steps; "
        f"load {os.getloadavg()[0]:.2f}",
        file=sys.stderr,
        flush=True,
    )
    import torch

    gpu = GpuProcessMemory.for_device(a.device)
    out: dict[str, Any] = {
        "header": {
            "command": [sys.executable, *sys.argv] if argv is None else ["bench/gpu.py", *argv],
            "mode": "quick" if a.quick else "full",
            "device": a.device,
            "device_name": None,
            "device_total_memory_bytes": None,
            "nvidia_smi": _nvidia_smi_info() if a.device.startswith("cuda") else None,
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "task": mode.task,
            "parameters": None,
            "settings": {
                **dataclasses.asdict(mode),
                "workers": WORKERS,
                "nodes": 2,
                "warmup_rounds": WARMUP_ROUNDS,
                "seed": SEED,
                "node_args": _node_args(mode, a),
            },
            "versions": {
                "python": platform.python_version(),
                "locoswarm": _version("locoswarm"),
                "torch": _version("torch"),
                "hivemind": _version("hivemind"),
                "grpcio": _version("grpcio"),
            },
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "source": _source("locoswarm", "locoswarm"),
            "note": a.note,
            "loadavg_before": list(os.getloadavg()),
            "definitions": DEFINITIONS,
        },
        "complete": False,
        "baselines": {"plain_alone": {}, "plain_concurrent": {}},
        "swarm": {},
        "notes": NOTES,
    }
    baselines = out["baselines"]

    def save() -> None:
        out.update(summarise(baselines["plain_alone"], baselines["plain_concurrent"], out["swarm"]))
        out["wall_s"] = time.perf_counter() - started
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(_finite(out), indent=1, default=str))

    with contextlib.ExitStack() as stack:
        if a.log_dir:
            workdir = Path(a.log_dir)
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-bench-")))
        end = time.monotonic() + (a.budget or mode.budget_s)
        phases = (  # (name, timeout, run); the timeout leaves the later phases their minimum
            (
                "plain_alone",
                lambda: min(mode.plain_timeout_s, end - time.monotonic() - 2 * mode.min_phase_s),
                lambda t: run_plain(mode, a, workdir, 1, gpu, t),
            ),
            (
                "plain_concurrent",
                lambda: min(mode.plain_timeout_s, end - time.monotonic() - mode.min_phase_s),
                lambda t: run_plain(mode, a, workdir, WORKERS, gpu, t),
            ),
            (
                "swarm",
                lambda: min(mode.swarm_timeout_s, end - time.monotonic() - STOP_RESERVE_S),
                lambda t: run_swarm(mode, a, workdir, gpu, t),
            ),
        )
        for name, timeout, run in phases:
            t0 = time.perf_counter()
            limit = timeout()
            result: dict[str, Any] = (
                run(limit)
                if limit >= MIN_TIMEOUT_S
                else {"error": f"skipped: {limit:.0f}s of the --budget left for it"}
            )
            result["timeout_s"] = limit
            (baselines if name in baselines else out)[name] = result
            if name == "plain_alone":
                w = (result.get("workers") or [{}])[0]
                for key in ("device_name", "device_total_memory_bytes", "parameters"):
                    out["header"][key] = w.get(key)
            save()
            print(
                f"  {name}: {time.perf_counter() - t0:.1f}s"
                + (f" ERROR {str(result['error'])[:300]}" if result.get("error") else ""),
                file=sys.stderr,
                flush=True,
            )
    out["header"]["loadavg_after"] = list(os.getloadavg())
    out["header"]["nvidia_smi_samples"] = gpu.samples
    if out["header"]["parameters"] is None:
        nodes = out["swarm"].get("nodes") or []
        params = [n["parameters"] for n in nodes if n["parameters"]]
        out["header"]["parameters"] = params[0] if params else None
    out["complete"] = True
    save()
    plot(out, png)
    print_table(out)
    print(f"wrote {json_path} and {png} in {out['wall_s']:.1f}s", file=sys.stderr)
    return 0


DEFINITIONS = {
    "plain tokens_per_s": "timed steps * batch * seq_len / seconds from the end of the warm-up "
    "to the end of the last step (every step ends with float(loss))",
    "plain tokens_per_s_shared": "concurrent workers: the same over the window in which both "
    "timed steps (later start to earlier end), from the first to the last step end inside it",
    "node tokens_per_s": "locoswarm_trainer_tokens_total over wall time between the first and "
    "the last counter update seen inside the swarm window (every node past round 1, none done "
    "with its last round); update times are the first scrape that saw them (<= poll_s late)",
    "node tokens_per_s_compute_idle": "the same tokens over the window's compute + idle seconds",
    "node untracked_fraction": "1 - (compute + idle) / wall over the window: round-boundary "
    "work (snapshot, apply) outside both counters",
    "node tokens_per_s_whole_run_compute_idle": "tokens / (compute + idle), whole run, last scrape",
    "idle_fraction": "idle / (idle + compute), whole run, last scrape (idle_fraction_window: "
    "over the window)",
    "outer_step_s": "locoswarm_sync_exchange_seconds sum / count with result ok (matchmaking "
    "including the wait for the partner's boundary, transfer, update); outer_step_s_all: any "
    "result",
    "device_memory_peak_bytes": "locoswarm_trainer_device_memory_peak_bytes, highest scraped "
    "(torch.cuda.max_memory_allocated in the node; 0 on CPU)",
    "peak_memory_allocated_bytes": "torch.cuda.max_memory_allocated of a plain worker at its end",
    "gpu_process_memory_bytes": "largest used_memory nvidia-smi showed for the process (node: "
    "or its children), CUDA context and allocator cache included; None without nvidia-smi",
    "memory_overhead": "largest node device_memory_peak_bytes / plain alone's - 1",
    "tokens_per_s_loss_vs_concurrent": "1 - sum of the nodes' tokens/s / sum of the concurrent "
    "plain workers' tokens/s",
}

NOTES = {
    "sharing": "the two nodes share one device, so each node's tokens/s is compared against "
    "plain training run alone (swarm_share_of_plain_alone, where about 1.0 for the sum means "
    "the sharing itself costs nothing) and, better, against two plain loops run concurrently "
    "on the same device (tokens_per_s_loss_vs_concurrent, which the check uses): the same "
    "contention, without the daemon",
    "plain loop": "plain workers call locoswarm.node.trainer.Trainer.inner_step() in a loop: the "
    "node's own inner step (task built as the daemon builds it, InnerLoop, bf16 autocast on "
    "CUDA), without the daemon's thread, snapshots, outer steps, DHT or gRPC",
    "evaluation": "nodes run with --eval-every 0 (no validation passes) so that both sides "
    "train only; the node's default evaluates every 10 rounds",
    "warm-up": "plain: --warmup steps excluded; nodes: the first round excluded (CUDA warm-up, "
    "allocator growth, the joiner's state fetch); peaks are not reset after warm-up",
    "cpu": "with --device cpu the device memory figures are 0 and the memory check is n/a; the "
    "quick run checks that every part works, its figures mean nothing",
}


if __name__ == "__main__":
    sys.exit(main())
