"""Swarm benchmark: real ``locoswarm run`` daemons on 127.0.0.1: idle fraction, bytes, memory.

Usage: python -m bench.swarm [--quick] --json out/swarm.json [--png out/swarm.png]

Per configuration a fresh swarm of real daemons (``python -m locoswarm run``, each in its own
session). The first starts a swarm; its DHT identity (``--set peers.identity_path``) and port
(``--dht-port``) are chosen here, so its multiaddr is known in advance: the others start with
``--join`` that address as soon as its DHT accepts connections, instead of waiting for its ready
file (``--join-from-ready-file`` restores that; then the first trains alone for the seconds the
others take to start). The ready file's ``maddrs`` is checked to hold the address given. Every
node runs with ``--host 127.0.0.1 --threads 1 --metrics-port 0 --log-every 1 --seed 0 --max-bytes
N --rounds R --inner-steps H --max-upload-mbps CAP --match-deadline D`` and stops itself after
``R`` rounds. Configurations, measured one after the other in the same run:

1. ``overlap_noloco``: the default: the outer step overlaps the next inner phase;
2. ``blocking_noloco``: ``--blocking``: training waits for each outer step;
3. ``blocking_diloco``: ``--sync diloco --blocking``;
4. ``memory_small`` (unless ``--no-small``; not in ``--quick``): overlapped noloco (or
   ``--small-sync``) with ``--task
   small`` (10.6M parameters), fewer nodes and steps: the memory comparison that means something
   (the tiny model's 1.1 MB fp32 copy is lost in interpreter and library overhead).
   ``--small-task base`` runs it with the 114M-parameter model instead (the configuration keeps
   its name), where the process's fixed overhead weighs a tenth as much per copy;
   ``--small-batch-size`` / ``--small-seq-len`` shrink its batches (activations are the same in
   the node and the plain baseline, so the copies above it do not depend on them) so that it
   trains on CPU in minutes (give it ``--max-upload-mbps 0``: its 457 MB messages take longer
   than the exchange timeout at the default cap).

While a node runs, the benchmark polls (every ``POLL_S``) its Prometheus ``/metrics`` (URL from
the ready file), and ``VmHWM`` / ``VmRSS`` of the node and of every process below it (the
hivemind DHT process and its ``p2pd``; found and read with psutil, except ``VmHWM``, which psutil
lacks: from ``/proc/<pid>/status``). A node closes ``/metrics``
when it stops itself, so the figures are those of the last scrape before it exited
(``metrics_age_s`` says how old). ``VmHWM`` is a high-water mark, so the last read is the peak.

Per node: idle fraction ``idle / (idle + compute)`` from ``locoswarm_trainer_idle_seconds_total``
and ``locoswarm_trainer_compute_seconds_total``; bytes sent and received
(``locoswarm_protocol_{sent,received}_bytes_total``, by kind); outer steps by result
(``locoswarm_sync_exchanges_total{result}``); the loss (``locoswarm_trainer_loss`` and the last
"round N: ..., train loss X" line of its log); rounds done, exchanged and solo (log); peak memory.

Memory baseline: ``python -m bench.swarm --role plain`` builds the same task the node builds
(``TaskFactory(TaskConfig(name, max_bytes)).build(replica=0, num_replicas=1, seed)``), trains it
with AdamW (the node's inner defaults, gradient clipping, same batch size) for ``R * H`` steps and
reports its own ``VmHWM``; once bare and once after importing what the daemon imports
(``locoswarm.node.daemon``, ``locoswarm.node.run``, hivemind, grpc, uvloop, prometheus_client),
which isolates the daemon's training-related overhead. Overhead = node ``VmHWM`` - baseline
``VmHWM``, in bytes and in fp32 model copies (parameters * 4 bytes); the DHT process and
``p2pd`` are reported beside it, not in it.

Checks: overlapped idle fraction <= 5% on every node (with whether the exchange was shorter than
an inner phase, and the blocking modes' figures beside it); memory overhead <= 3 fp32 copies.
Writes JSON and a PNG; prints a table to stderr. Every process group is killed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import math
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from bench.common import finite as _finite
from bench.common import print_checks, start_node
from bench.common import source as _source
from bench.common import version as _version
from locoswarm.node import processes

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]

FULL_NODES, FULL_ROUNDS, FULL_INNER_STEPS = 4, 12, 50
QUICK_NODES, QUICK_ROUNDS, QUICK_INNER_STEPS = 2, 6, 20
SMALL_NODES, SMALL_ROUNDS, SMALL_INNER_STEPS = 2, 6, 8
SMALL_MATCH_DEADLINE_S = 10.0
"""The daemon's default: a 42 MB payload takes 3.4 s at 100 Mbit/s, and the nodes' round
boundaries drift seconds apart with 1 s steps."""
MAX_UPLOAD_MBPS = 100.0
MAX_BYTES = 200_000
MATCH_DEADLINE_S = 3.0
THREADS = 1
SEED = 0
LOG_EVERY_S = 1.0
POLL_S = 0.25
SCRAPE_TIMEOUT_S = 2.0
READY_TIMEOUT_S = 120.0
FULL_CONFIG_TIMEOUT_S = 300.0
QUICK_CONFIG_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
BASELINE_TIMEOUT_S = 600.0
LOG_TAIL_CHARS = 3000
TIMELINE_POINTS = 40

IDLE_TARGET = 0.05
MEMORY_TARGET_COPIES = 3.0
LOOP_LAG = "locoswarm_node_event_loop_lag_seconds"
LOOP_LAG_TARGET_S = 0.05
FP32_BYTES = 4

TINY_CONFIGS = (
    ("overlap_noloco", "noloco", False),
    ("blocking_noloco", "noloco", True),
    ("blocking_diloco", "diloco", True),
)
SMALL_CONFIG = "memory_small"
BASELINE_VARIANTS = ("plain", "plain_with_daemon_imports")

PROGRESS_RE = re.compile(r"^step (\d+)\s+round (\d+)\s+loss (\S+)\s.*idle ([\d.]+)%", re.M)
LATE_JOIN_RE = re.compile(r"late join: fetched the outer weights of round (\d+)")
CATCH_UP_RE = re.compile(r"round (\d+): the swarm is at round (\d+); catching up")
OUTER_STEP_RE = re.compile(r"^locoswarm_sync_outer_step (\S+)$", re.M)
EXCHANGE_ERR_RE = re.compile(r"exchange with \S+ for round (\d+): (.*)")


# ----------------------------------------------------------------------------------------------
# Helpers


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _vmhwm(pid: int) -> int | None:
    """VmHWM (peak resident memory, bytes) of a process; None when gone or without one.

    The one value psutil does not give on Linux (``memory_info`` has the current RSS only), and
    ``resource.getrusage`` gives a peak for this process alone, counting the memory it had before
    ``exec``; so this, and only this, is read from ``/proc/<pid>/status``.
    """
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def _proc_status(pid: int) -> dict[str, Any] | None:
    """Name, VmHWM and VmRSS (bytes) of a live process; None when gone or a zombie."""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            out: dict[str, Any] = {"name": proc.name(), "VmRSS": proc.memory_info().rss}
    except psutil.Error:
        return None
    hwm = _vmhwm(pid)
    if hwm is None:
        return None
    out["VmHWM"] = hwm
    return out


def _below(pid: int) -> list[int]:
    """Live processes below ``pid`` (children first, then theirs)."""
    try:
        below = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    return [child.pid for child in below]


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text exposition -> (sample name, labels, value)."""
    from prometheus_client.parser import text_string_to_metric_families

    return [
        (s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def _sample(
    samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str
) -> float | None:
    """Sum of the samples named ``name`` whose labels include ``labels``; None if none."""
    found = [
        v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())
    ]
    return sum(found) if found else None


def _by_label(
    samples: list[tuple[str, dict[str, str], float]], name: str, label: str
) -> dict[str, float]:
    return {lab[label]: v for n, lab, v in samples if n == name and label in lab}


def histogram_quantile(
    samples: list[tuple[str, dict[str, str], float]], name: str, q: float
) -> float | None:
    """The upper bound of the histogram bucket that holds quantile ``q`` (an upper estimate:
    the true quantile is at most this), from the ``<name>_bucket`` samples; None if empty."""
    buckets = sorted(
        (float(lab["le"]), v) for n, lab, v in samples if n == f"{name}_bucket" and "le" in lab
    )
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    return next(le for le, count in buckets if count >= q * total)


# ----------------------------------------------------------------------------------------------
# The plain-training baseline (``--role plain``): its own process, reports its own VmHWM.


def plain_main(
    task: str,
    max_bytes: int,
    steps: int,
    threads: int,
    seed: int,
    daemon_imports: bool,
    sizes: dict[str, int] | None = None,
) -> int:
    """Train the node's task without a daemon for ``steps`` steps; print one JSON line."""
    started = time.perf_counter()
    if daemon_imports:
        import grpc  # noqa: F401
        import hivemind  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvloop  # noqa: F401

        import locoswarm.node.daemon
        import locoswarm.node.run  # noqa: F401
        from locoswarm.node.allocator import tune_for

        # The node's C allocator settings too: the node's own tuning is not counted as saving.
        tune_for()
    import torch

    from locoswarm.tasks.inner import InnerConfig, InnerLoop
    from locoswarm.tasks.task import TaskConfig, TaskFactory

    hwm_imports = (_proc_status(os.getpid()) or {}).get("VmHWM")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    sizes = sizes or {}
    cfg = TaskConfig(name=task, max_bytes=max_bytes)
    cfg = replace(
        cfg,
        batch_size=sizes.get("batch_size", cfg.batch_size),
        seq_len=sizes.get("seq_len", cfg.seq_len),
    )
    built = TaskFactory(cfg).build(replica=0, num_replicas=1, seed=seed)
    model = built.model
    loop = InnerLoop(model, InnerConfig(), total_steps=None)
    hwm_built = (_proc_status(os.getpid()) or {}).get("VmHWM")
    train_started = time.perf_counter()
    loss_value = math.nan
    for _ in range(steps):
        model.train()
        loss_value = loop.step(built.loss(model, next(built.batches)))
    train_s = time.perf_counter() - train_started
    status = _proc_status(os.getpid()) or {}
    out = {
        "task": task,
        "daemon_imports": daemon_imports,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "threads": threads,
        "final_loss": loss_value,
        "train_s": train_s,
        "step_s": train_s / steps if steps else None,
        "wall_s": time.perf_counter() - started,
        "vmhwm_bytes": status.get("VmHWM"),
        "vmrss_bytes": status.get("VmRSS"),
        "vmhwm_after_imports_bytes": hwm_imports,
        "vmhwm_after_build_bytes": hwm_built,
        "modules_loaded": len(sys.modules),
    }
    print(json.dumps(_finite(out)), flush=True)
    return 0


def run_baselines(
    task: str, steps: int, max_bytes: int, threads: int, task_args: tuple[str, ...] = ()
) -> dict[str, dict[str, Any]]:
    """Both baseline variants, side by side (memory does not depend on the CPU share).
    ``task_args``: the nodes' ``--batch-size`` / ``--seq-len``, if any."""
    started: dict[str, tuple[subprocess.Popen[str], float]] = {}
    for variant in BASELINE_VARIANTS:
        cmd = [
            sys.executable,
            "-m",
            "bench.swarm",
            "--role",
            "plain",
            "--task",
            task,
            "--max-bytes",
            str(max_bytes),
            "--steps",
            str(steps),
            "--threads",
            str(threads),
            "--seed",
            str(SEED),
            *(["--daemon-imports"] if variant != "plain" else []),
            *task_args,
        ]
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        started[variant] = (proc, time.perf_counter())
    results: dict[str, dict[str, Any]] = {}
    for variant, (proc, t0) in started.items():
        try:
            stdout, stderr = proc.communicate(timeout=BASELINE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
        if proc.returncode == 0 and lines:
            results[variant] = {**json.loads(lines[-1]), "error": None}
        else:
            results[variant] = {
                "error": f"exit {proc.returncode}: {stderr[-LOG_TAIL_CHARS:]}",
                "vmhwm_bytes": None,
            }
        results[variant]["process_wall_s"] = time.perf_counter() - t0
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return results


# ----------------------------------------------------------------------------------------------
# One swarm configuration


@dataclass(frozen=True)
class Config:
    name: str
    sync: str
    blocking: bool
    task: str
    nodes: int
    rounds: int
    inner_steps: int
    match_deadline_s: float
    task_args: tuple[str, ...] = ()
    """``--batch-size`` / ``--seq-len`` for the task, if not its own."""

    def args(self, a: argparse.Namespace) -> list[str]:
        return [
            "--run-id",
            f"bench-swarm-{self.name}",
            "--host",
            HOST,
            "--metrics-port",
            "0",
            "--threads",
            str(a.threads),
            "--log-every",
            f"{LOG_EVERY_S:g}",
            "--seed",
            str(SEED),
            "--task",
            self.task,
            "--max-bytes",
            str(a.max_bytes),
            "--rounds",
            str(self.rounds),
            "--inner-steps",
            str(self.inner_steps),
            "--match-deadline",
            f"{self.match_deadline_s:g}",
            "--sync",
            self.sync,
            *(["--max-upload-mbps", f"{a.max_upload_mbps:g}"] if a.max_upload_mbps else []),
            *(["--blocking"] if self.blocking else []),
            *self.task_args,
        ]


@dataclass
class NodeRun:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    ready: Path
    cmd: list[str]
    started: float
    info: dict[str, Any] | None = None
    ready_s: float | None = None
    metrics_text: str | None = None
    metrics_at: float | None = None
    metrics_all_up: str | None = None
    """The first scrape once every node of the swarm was up (the start of the swarm phase)."""
    scrapes: int = 0
    scrape_errors: int = 0
    last_scrape_error: str | None = None
    memory: dict[int, dict[str, Any]] = field(default_factory=dict)
    exited_at: float | None = None
    outer_step: float | None = None
    timeline: list[tuple[float, int, int, float | None]] = field(default_factory=list)
    """(seconds since start, VmRSS, VmHWM, outer step of the last scrape) per poll (main pid)."""
    at_ready: tuple[int, int] | None = None
    """(VmRSS, VmHWM) at the first poll after the ready file: model built, before the rounds."""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def load_info(self) -> None:
        if self.info is None and self.ready.exists():
            raw = self.ready.read_text().strip()
            if raw:
                with contextlib.suppress(json.JSONDecodeError):
                    self.info = dict(json.loads(raw))
                    self.ready_s = time.monotonic() - self.started

    def scrape(self) -> None:
        url = (self.info or {}).get("metrics")
        if not url:
            return
        try:
            with urllib.request.urlopen(str(url), timeout=SCRAPE_TIMEOUT_S) as reply:
                text = reply.read().decode()
        except OSError as exc:
            self.scrape_errors += 1
            self.last_scrape_error = f"{type(exc).__name__}: {exc}"
            return
        self.metrics_text, self.metrics_at = text, time.monotonic()
        found = OUTER_STEP_RE.search(text)
        if found:
            self.outer_step = float(found.group(1))
        self.scrapes += 1

    def read_memory(self) -> None:
        for pid in [self.pid, *_below(self.pid)]:
            status = _proc_status(pid)
            if status is None:
                continue
            seen = self.memory.setdefault(pid, {"name": status["name"], "vmhwm_bytes": 0})
            seen["name"] = status["name"]
            seen["vmhwm_bytes"] = max(seen["vmhwm_bytes"], status["VmHWM"])
            seen["vmrss_bytes"] = status.get("VmRSS")
            if pid == self.pid:
                t = time.monotonic() - self.started
                self.timeline.append((t, status.get("VmRSS", 0), status["VmHWM"], self.outer_step))
                if self.info is not None and self.at_ready is None:
                    self.at_ready = (status.get("VmRSS", 0), status["VmHWM"])


def _first_identity(workdir: Path, cfg: Config) -> tuple[list[str], str, int]:
    """node0's DHT identity file and port, chosen here so that its multiaddr is known before it
    is ready: ``(extra node0 args, multiaddr, port)``."""
    from hivemind.p2p import P2P, PeerID

    path = workdir / f"{cfg.name}-node0.identity"
    path.unlink(missing_ok=True)
    P2P.generate_identity(str(path))
    peer_id = PeerID.from_identity(path.read_bytes())
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
    args = ["--dht-port", str(port), "--set", f"peers.identity_path={path}"]
    return args, f"/ip4/{HOST}/tcp/{port}/p2p/{peer_id}", port


def _wait_listening(first: NodeRun, port: int) -> None:
    """Until node0's DHT (its p2pd) accepts TCP connections on ``port``."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        if first.proc.poll() is not None:
            raise RuntimeError(f"node0 exited {first.proc.returncode} before its DHT was up")
        if time.monotonic() > deadline:
            raise RuntimeError(f"node0's DHT not listening within {READY_TIMEOUT_S:.0f}s")
        time.sleep(0.1)


def _start_node(
    cfg: Config,
    a: argparse.Namespace,
    workdir: Path,
    i: int,
    join: str | None,
    extra: tuple[str, ...] = (),
) -> NodeRun:
    name = f"node{i}"
    log, ready = workdir / f"{cfg.name}-{name}.log", workdir / f"{cfg.name}-{name}.json"
    args = [
        *cfg.args(a),
        # A quick run's rounds last about a second: without waiting, node0 can finish all of
        # them before the others have joined.
        *(["--set", "peers.min_peers=1"] if a.quick and cfg.nodes > 1 else []),
        *extra,
    ]
    proc, cmd = start_node(args, log=log, ready=ready, join=join, cwd=ROOT)
    return NodeRun(name, proc, log, ready, cmd, time.monotonic())


def _wait_ready(first: NodeRun, nodes: list[NodeRun]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while first.info is None:
        if first.proc.poll() is not None:
            raise RuntimeError(f"node0 exited {first.proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"node0 not ready within {READY_TIMEOUT_S:.0f}s")
        time.sleep(0.1)
        _poll(nodes)


def _poll(nodes: list[NodeRun]) -> None:
    for node in nodes:
        if node.proc.poll() is not None:
            if node.exited_at is None:
                node.exited_at = time.monotonic()
            continue
        node.load_info()
        node.read_memory()
        node.scrape()


def _log_summary(text: str) -> dict[str, Any]:
    from locoswarm.sim.replay import round_events  # the daemon's own round records

    rounds: list[dict[str, Any]] = [
        {
            "round": int(e["round"]),
            "how": "exchanged" if e["outcome"] == "exchanged" else "solo",
            "why": "ok" if e["outcome"] == "exchanged" else e["outcome"],
            "loss": float(e["loss"]),
            "seconds": float(e["seconds"]),
        }
        for e in round_events(text)
    ]
    progress = [float(m.group(4)) / 100 for m in PROGRESS_RE.finditer(text)]
    late = LATE_JOIN_RE.search(text)
    bootstrap_failures = text.count("DHT bootstrap attempt")
    errors = [f"round {r}: {msg}" for r, msg in EXCHANGE_ERR_RE.findall(text)]
    exchanged = [r["seconds"] for r in rounds if r["how"] == "exchanged"]
    return {
        "rounds_done": len(rounds),
        "rounds_exchanged": len(exchanged),
        "rounds_solo": len(rounds) - len(exchanged),
        "solo_reasons": dict(
            sorted(
                {
                    w: sum(1 for r in rounds if r["how"] == "solo" and r["why"] == w)
                    for w in {r["why"] for r in rounds if r["how"] == "solo"}
                }.items(),
                key=lambda kv: str(kv[0]),
            )
        ),
        "first_round": rounds[0]["round"] if rounds else None,
        "last_round": rounds[-1]["round"] if rounds else None,
        "first_loss": rounds[0]["loss"] if rounds else None,
        "final_loss": rounds[-1]["loss"] if rounds else None,
        "round_s_median": _median([r["seconds"] for r in rounds]),
        "exchanged_round_s_median": _median(exchanged),
        "exchanged_round_s_max": max(exchanged) if exchanged else None,
        "late_join_round": int(late.group(1)) if late else None,
        "catch_ups": [(int(a), int(b)) for a, b in CATCH_UP_RE.findall(text)],
        "bootstrap_failures": bootstrap_failures,
        "exchange_errors": len(errors),
        "exchange_error_lines": errors[:5],
        "progress_lines": len(progress),
        "progress_idle_mean": statistics.fmean(progress) if progress else None,
        "finished": re.search(r"finished \d+ rounds", text) is not None,
        "warnings": text.count(" WARNING "),
        "errors": text.count(" ERROR "),
        "traceback": "Traceback" in text,
        "rounds": [(r["round"], r["how"], r["why"], r["loss"], r["seconds"]) for r in rounds],
    }


def _metrics_summary(text: str | None, inner_steps: int) -> dict[str, Any]:
    if text is None:
        return {"idle_fraction": None, "error": "no successful scrape"}
    s = parse_metrics(text)
    compute = _sample(s, "locoswarm_trainer_compute_seconds_total") or 0.0
    idle = _sample(s, "locoswarm_trainer_idle_seconds_total") or 0.0
    steps = _sample(s, "locoswarm_trainer_inner_steps_total") or 0.0
    ex_sum = _sample(s, "locoswarm_sync_exchange_seconds_sum")
    ex_count = _sample(s, "locoswarm_sync_exchange_seconds_count")
    rejected = {
        k: v for k, v in _by_label(s, "locoswarm_protocol_rejected_total", "reason").items() if v
    }
    return {
        "idle_fraction": idle / (idle + compute) if idle + compute > 0 else None,
        "idle_s": idle,
        "compute_s": compute,
        "inner_steps": steps,
        "step_s": compute / steps if steps else None,
        "inner_phase_s": compute / steps * inner_steps if steps else None,
        "sent_bytes": _sample(s, "locoswarm_protocol_sent_bytes_total") or 0.0,
        "received_bytes": _sample(s, "locoswarm_protocol_received_bytes_total") or 0.0,
        "sent_bytes_by_kind": _by_label(s, "locoswarm_protocol_sent_bytes_total", "kind"),
        "received_bytes_by_kind": _by_label(s, "locoswarm_protocol_received_bytes_total", "kind"),
        "exchanges": _by_label(s, "locoswarm_sync_exchanges_total", "result"),
        "exchange_s_mean": ex_sum / ex_count if ex_sum is not None and ex_count else None,
        "exchange_count": ex_count,
        "loss": _sample(s, "locoswarm_trainer_loss"),
        "outer_step": _sample(s, "locoswarm_sync_outer_step"),
        "peers": _sample(s, "locoswarm_peers_live"),
        "rejected": rejected,
        "loop_lag_p99_s": histogram_quantile(s, LOOP_LAG, 0.99),
        "loop_lag_p50_s": histogram_quantile(s, LOOP_LAG, 0.5),
        "loop_lag_samples": _sample(s, f"{LOOP_LAG}_count"),
    }


def _downsample(
    points: list[tuple[float, int, int, float | None]], n: int
) -> list[tuple[float, int, int, float | None]]:
    """At most ``n`` points: the highest-RSS sample of each of ``n`` equal runs of samples."""
    if len(points) <= n:
        return points
    size = len(points) / n
    bins = [points[int(i * size) : int((i + 1) * size)] for i in range(n)]
    return [max(b, key=lambda p: p[1]) for b in bins if b]


def _kind(name: str) -> str:
    if name == "p2pd":
        return "p2pd"
    if name.startswith("torch_shm"):
        return "torch_shm_manager"
    return "dht" if name.startswith("python") else "other"


def _swarm_phase(start: str | None, end: str | None) -> dict[str, Any]:
    """Counter deltas from the scrape when every node was up to the last scrape."""
    if start is None or end is None:
        return {"idle_fraction": None, "error": "no scrape at the start or the end"}
    a, b = parse_metrics(start), parse_metrics(end)

    def delta(name: str) -> float:
        return (_sample(b, name) or 0.0) - (_sample(a, name) or 0.0)

    idle = delta("locoswarm_trainer_idle_seconds_total")
    compute = delta("locoswarm_trainer_compute_seconds_total")
    before = _by_label(a, "locoswarm_sync_exchanges_total", "result")
    after = _by_label(b, "locoswarm_sync_exchanges_total", "result")
    return {
        "idle_fraction": idle / (idle + compute) if idle + compute > 0 else None,
        "idle_s": idle,
        "compute_s": compute,
        "inner_steps": delta("locoswarm_trainer_inner_steps_total"),
        "exchanges": {k: v - before.get(k, 0.0) for k, v in after.items()},
        "sent_bytes": delta("locoswarm_protocol_sent_bytes_total"),
        "outer_step_at_start": _sample(a, "locoswarm_sync_outer_step"),
    }


def _node_result(node: NodeRun, cfg: Config) -> dict[str, Any]:
    text = node.text()
    main = node.memory.get(node.pid, {})
    children = [
        {
            "pid": pid,
            "name": m["name"],
            "kind": _kind(m["name"]),
            "vmhwm_bytes": m["vmhwm_bytes"],
        }
        for pid, m in node.memory.items()
        if pid != node.pid
    ]
    metrics = _metrics_summary(node.metrics_text, cfg.inner_steps)
    age = None
    if node.metrics_at is not None:
        age = (node.exited_at or time.monotonic()) - node.metrics_at
    out: dict[str, Any] = {
        "name": node.name,
        "role": "first" if node.name == "node0" else "joiner",
        "pid": node.pid,
        "pgid": node.pid,
        "exit_code": node.proc.returncode,
        "ready_s": node.ready_s,
        "run_s": (node.exited_at - node.started) if node.exited_at else None,
        "parameters": (node.info or {}).get("parameters"),
        "peer_id": (node.info or {}).get("peer_id"),
        "scrapes": node.scrapes,
        "scrape_errors": node.scrape_errors,
        "last_scrape_error": node.last_scrape_error,
        "metrics_age_s": age,
        **metrics,
        "log": _log_summary(text),
        "vmhwm_bytes": main.get("vmhwm_bytes"),
        "vmrss_at_ready_bytes": node.at_ready[0] if node.at_ready else None,
        "vmhwm_at_ready_bytes": node.at_ready[1] if node.at_ready else None,
        "memory_timeline": [
            [round(t, 2), round(rss / 1e6, 1), round(hwm / 1e6, 1), step]
            for t, rss, hwm, step in _downsample(node.timeline, TIMELINE_POINTS)
        ],
        "children": children,
        "dht_vmhwm_bytes": max(
            (c["vmhwm_bytes"] for c in children if c["kind"] == "dht"), default=0
        ),
        "p2pd_vmhwm_bytes": max(
            (c["vmhwm_bytes"] for c in children if c["kind"] == "p2pd"), default=0
        ),
        "dht_processes": sum(1 for c in children if c["kind"] == "dht"),
        "pids_seen": sorted(node.memory) or [node.pid],
    }
    log = out["log"]
    out["final_loss"] = log["final_loss"] if log["final_loss"] is not None else metrics.get("loss")
    counted = sum((metrics.get("exchanges") or {}).values())
    out["metrics_missing_rounds"] = (
        log["rounds_done"] - counted if metrics.get("exchanges") else None
    )
    out["swarm_phase"] = _swarm_phase(node.metrics_all_up, node.metrics_text)
    out["idle_fraction_swarm"] = out["swarm_phase"].get("idle_fraction")
    if node.proc.returncode not in (0, None) or log["traceback"] or not log["finished"]:
        out["log_tail"] = text[-LOG_TAIL_CHARS:]
    return out


def run_config(cfg: Config, a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One swarm: start, watch until every node has stopped itself, kill every group."""
    started = time.monotonic()
    nodes: list[NodeRun] = []
    error: str | None = None
    leftovers: list[int] = []
    all_up_s: float | None = None
    join_address: str | None = None
    try:
        if a.join_from_ready_file:
            first = _start_node(cfg, a, workdir, 0, None)
            nodes.append(first)
            _wait_ready(first, nodes)
            assert first.info is not None
            maddrs = first.info.get("maddrs") or []
            if not maddrs:
                raise RuntimeError(f"node0's ready file has no maddrs: {first.info}")
            join = str(maddrs[0])
            nodes.extend(_start_node(cfg, a, workdir, i, join) for i in range(1, cfg.nodes))
        else:
            extra, join, port = _first_identity(workdir, cfg)
            first = _start_node(cfg, a, workdir, 0, None, tuple(extra))
            nodes.append(first)
            _wait_listening(first, port)
            nodes.extend(_start_node(cfg, a, workdir, i, join) for i in range(1, cfg.nodes))
            _wait_ready(first, nodes)
            assert first.info is not None
            maddrs = [str(m) for m in first.info.get("maddrs") or []]
            if join not in maddrs:
                raise RuntimeError(f"node0 is not at the address given to the others: {maddrs}")
        join_address = join
        deadline = started + a.config_timeout
        while any(n.proc.poll() is None for n in nodes):
            if time.monotonic() > deadline:
                error = f"timeout: nodes still running after {a.config_timeout:.0f}s"
                break
            t0 = time.monotonic()
            _poll(nodes)
            if all_up_s is None and all(n.info is not None for n in nodes):
                all_up_s = time.monotonic() - started
                for n in nodes:
                    n.metrics_all_up = n.metrics_text
            time.sleep(max(0.0, POLL_S - (time.monotonic() - t0)))
        _poll(nodes)
    except Exception as exc:  # noqa: BLE001 - recorded; the benchmark carries on
        error = f"{type(exc).__name__}: {exc}"
    finally:
        leftovers = _stop_all(nodes)
    results = [_node_result(n, cfg) for n in nodes]
    if leftovers:
        error = (error + "; " if error else "") + f"processes left after the kill: {leftovers}"
    return {
        "config": {
            "sync": cfg.sync,
            "blocking": cfg.blocking,
            "overlap": not cfg.blocking,
            "task": cfg.task,
            "nodes": cfg.nodes,
            "rounds": cfg.rounds,
            "inner_steps": cfg.inner_steps,
            "match_deadline_s": cfg.match_deadline_s,
        },
        "command": nodes[0].cmd if nodes else None,
        "wall_s": time.monotonic() - started,
        "all_up_s": all_up_s,
        "join_address": join_address,
        "start": "node0 first, the others once its ready file is written"
        if a.join_from_ready_file
        else "all nodes at once; node0's DHT identity and port chosen beforehand",
        "error": error,
        "leftover_pids": leftovers,
        "nodes": results,
        "summary": _config_summary(results, a.max_upload_mbps),
    }


def _stop_all(nodes: list[NodeRun]) -> list[int]:
    """SIGTERM the nodes still running, wait, then SIGKILL every group; return survivors."""
    for node in nodes:
        if node.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                node.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while any(n.proc.poll() is None for n in nodes) and time.monotonic() < deadline:
        time.sleep(0.2)
    pids: set[int] = set()
    for node in nodes:
        pids |= set(node.memory) | {node.pid}
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(node.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.proc.wait(timeout=10)
        if node.exited_at is None:
            node.exited_at = time.monotonic()
    deadline = time.monotonic() + 10
    alive = {p for p in pids if _proc_status(p) is not None}
    for node in nodes:
        alive |= processes.in_group(node.pid)
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = {p for p in alive if _proc_status(p) is not None}
    return sorted(alive)


def _config_summary(nodes: list[dict[str, Any]], cap_mbps: float | None) -> dict[str, Any]:
    idle = [n["idle_fraction"] for n in nodes if n.get("idle_fraction") is not None]
    swarm = [n["idle_fraction_swarm"] for n in nodes if n.get("idle_fraction_swarm") is not None]
    phase = [n["inner_phase_s"] for n in nodes if n.get("inner_phase_s")]
    exchanged = [
        n["log"]["exchanged_round_s_median"]
        for n in nodes
        if n["log"]["exchanged_round_s_median"] is not None
    ]
    params = next((n["parameters"] for n in nodes if n.get("parameters")), None)
    results: dict[str, float] = {}
    for n in nodes:
        for k, v in (n.get("exchanges") or {}).items():
            results[k] = results.get(k, 0.0) + v
    return {
        "idle_fraction_mean": statistics.fmean(idle) if idle else None,
        "idle_fraction_max": max(idle) if idle else None,
        "idle_fraction_min": min(idle) if idle else None,
        "nodes_with_idle_figure": len(idle),
        "idle_fraction_swarm_mean": statistics.fmean(swarm) if swarm else None,
        "idle_fraction_swarm_max": max(swarm) if swarm else None,
        "nodes_with_swarm_idle_figure": len(swarm),
        "sent_bytes": sum(n.get("sent_bytes") or 0.0 for n in nodes),
        "received_bytes": sum(n.get("received_bytes") or 0.0 for n in nodes),
        "exchanges": results,
        "rounds_exchanged": sum(n["log"]["rounds_exchanged"] for n in nodes),
        "rounds_done": sum(n["log"]["rounds_done"] for n in nodes),
        "inner_phase_s_median": _median(phase),
        "exchanged_round_s_median": _median(exchanged),
        "exchanged_round_s_per_node": [n["log"]["exchanged_round_s_median"] for n in nodes],
        "exchange_s_estimate": min(exchanged) if exchanged else None,
        "transfer_s_at_cap": params * FP32_BYTES / (cap_mbps * 1e6 / 8)
        if params and cap_mbps
        else None,
        "exchange_shorter_than_inner_phase": (
            min(exchanged) < statistics.median(phase) if exchanged and phase else None
        ),
        "final_loss_mean": statistics.fmean(
            [n["final_loss"] for n in nodes if n.get("final_loss") is not None]
        )
        if any(n.get("final_loss") is not None for n in nodes)
        else None,
        "max_vmhwm_bytes": max((n["vmhwm_bytes"] or 0) for n in nodes) if nodes else None,
        "loop_lag_p99_s_max": max(lags) if (lags := _present(nodes, "loop_lag_p99_s")) else None,
        "loop_lag_p99_s_per_node": [n.get("loop_lag_p99_s") for n in nodes],
    }


def _present(nodes: list[dict[str, Any]], key: str) -> list[float]:
    return [n[key] for n in nodes if n.get(key) is not None]


# ----------------------------------------------------------------------------------------------
# Memory comparison and checks


def memory_report(
    configs: dict[str, dict[str, Any]], baselines: dict[str, dict[str, dict[str, Any]]]
) -> dict[str, Any]:
    """Per task: node VmHWM minus each baseline's, in bytes and fp32 model copies."""
    out: dict[str, Any] = {}
    for task, variants in baselines.items():
        nodes = [
            (name, n)
            for name, c in configs.items()
            if c["config"]["task"] == task
            for n in c["nodes"]
            if n.get("vmhwm_bytes")
        ]
        params = next((n["parameters"] for _, n in nodes if n.get("parameters")), None)
        params = params or next(
            (v.get("parameters") for v in variants.values() if v.get("parameters")), None
        )
        copy_bytes = params * FP32_BYTES if params else None
        entry: dict[str, Any] = {
            "parameters": params,
            "fp32_copy_bytes": copy_bytes,
            "baseline_vmhwm_bytes": {k: v.get("vmhwm_bytes") for k, v in variants.items()},
            "baseline_vmhwm_after_build_bytes": {
                k: v.get("vmhwm_after_build_bytes") for k, v in variants.items()
            },
            "nodes": [],
        }
        for config, n in nodes:
            row: dict[str, Any] = {
                "config": config,
                "node": n["name"],
                "role": n["role"],
                "rounds_exchanged": n["log"]["rounds_exchanged"],
                "late_join": n["log"]["late_join_round"] is not None,
                "vmhwm_bytes": n["vmhwm_bytes"],
                "vmhwm_at_ready_bytes": n["vmhwm_at_ready_bytes"],
                "dht_vmhwm_bytes": n["dht_vmhwm_bytes"],
                "p2pd_vmhwm_bytes": n["p2pd_vmhwm_bytes"],
            }
            for variant, base in variants.items():
                hwm = base.get("vmhwm_bytes")
                over = n["vmhwm_bytes"] - hwm if hwm else None
                row[f"overhead_vs_{variant}_bytes"] = over
                row[f"overhead_vs_{variant}_copies"] = (
                    over / copy_bytes if over is not None and copy_bytes else None
                )
                built, ready = base.get("vmhwm_after_build_bytes"), n["vmhwm_at_ready_bytes"]
                row[f"at_ready_over_{variant}_built_bytes"] = (
                    ready - built if built and ready else None
                )
            entry["nodes"].append(row)
        for variant in variants:
            copies = [
                r[f"overhead_vs_{variant}_copies"]
                for r in entry["nodes"]
                if r[f"overhead_vs_{variant}_copies"] is not None
            ]
            over = [
                r[f"overhead_vs_{variant}_bytes"]
                for r in entry["nodes"]
                if r[f"overhead_vs_{variant}_bytes"] is not None
            ]
            entry[f"max_overhead_vs_{variant}_copies"] = max(copies) if copies else None
            entry[f"max_overhead_vs_{variant}_bytes"] = max(over) if over else None
            entry[f"median_overhead_vs_{variant}_copies"] = _median(copies)
        entry["meaningful"] = bool(params and params >= 1_000_000)
        entry["nodes_that_exchanged"] = sum(1 for r in entry["nodes"] if r["rounds_exchanged"])
        if entry["nodes"] and not entry["nodes_that_exchanged"]:
            entry["warning"] = (
                "no node completed an exchange: the peaks miss a partner's payload and tensors"
            )
        entry["note"] = (
            "the model's fp32 copy is large enough to stand out of process noise"
            if entry["meaningful"]
            else "the fp32 copy (~1 MB) is far below interpreter/library noise (tens of MB): "
            "these copy counts measure everything but the model"
        )
        out[task] = entry
    return out


def summarise(configs: dict[str, dict[str, Any]], memory: dict[str, Any]) -> dict[str, Any]:
    checks: dict[str, bool | None] = {}
    values: dict[str, Any] = {}
    notes: dict[str, str] = {}

    overlap = configs.get("overlap_noloco", {}).get("summary", {})
    whole, swarm = overlap.get("idle_fraction_max"), overlap.get("idle_fraction_swarm_max")
    idle = max((v for v in (whole, swarm) if v is not None), default=None)
    name = f"overlap noloco: idle fraction <= {IDLE_TARGET:.0%} on every node"
    checks[name] = None if idle is None else idle <= IDLE_TARGET
    values[name] = {
        "checked": idle,
        **{
            f"{c}_{stat}": configs.get(c, {}).get("summary", {}).get(f"idle_fraction_{stat}")
            for c in configs
            if c != SMALL_CONFIG
            for stat in ("mean", "max", "swarm_mean", "swarm_max")
        },
        "exchange_shorter_than_inner_phase": overlap.get("exchange_shorter_than_inner_phase"),
        "exchange_s_estimate": overlap.get("exchange_s_estimate"),
        "exchanged_round_s_per_node": overlap.get("exchanged_round_s_per_node"),
        "transfer_s_at_cap": overlap.get("transfer_s_at_cap"),
        "inner_phase_s_median": overlap.get("inner_phase_s_median"),
    }
    if idle is None:
        notes[name] = "no idle figure for the overlapped configuration"
    else:
        notes[name] = (
            "checked: the larger of the whole-run and the swarm-phase (every node up) maxima"
        )
        if overlap.get("exchange_shorter_than_inner_phase") is False:
            notes[name] += "; precondition not met: the exchange took longer than an inner phase"

    small = configs.get(SMALL_CONFIG, {}).get("summary", {})
    lag = small.get("loop_lag_p99_s_max")
    name = f"event-loop lag (small): p99 < {LOOP_LAG_TARGET_S * 1e3:.0f} ms on every node"
    checks[name] = None if lag is None else lag < LOOP_LAG_TARGET_S
    values[name] = {
        "p99_s_max": lag,
        "p99_s_per_node": small.get("loop_lag_p99_s_per_node"),
        **{
            f"{c}_p99_s_max": configs[c].get("summary", {}).get("loop_lag_p99_s_max")
            for c in configs
        },
    }
    notes[name] = (
        "p99 of how late a 50 ms timer woke (locoswarm_node_event_loop_lag_seconds), as the upper "
        "bound of its histogram bucket, over the whole run of every node"
    )

    for task in ("base", "small", "tiny"):
        entry = memory.get(task)
        if entry is None:
            continue
        for variant in BASELINE_VARIANTS:
            copies = entry.get(f"max_overhead_vs_{variant}_copies")
            key = (
                f"memory ({task}): node VmHWM - {variant} VmHWM <= "
                f"{MEMORY_TARGET_COPIES:g} fp32 model copies"
            )
            checks[key] = None if copies is None else copies <= MEMORY_TARGET_COPIES
            values[key] = {
                "max_copies": copies,
                "median_copies": entry.get(f"median_overhead_vs_{variant}_copies"),
                "max_bytes": entry.get(f"max_overhead_vs_{variant}_bytes"),
                "meaningful": entry["meaningful"],
            }
            if copies is None:
                notes[key] = "a figure is missing (a baseline or node failed)"
            elif not entry["meaningful"]:
                notes[key] = "not meaningful: " + entry["note"]
    return {"checks": checks, "check_values": values, "check_notes": notes}


# ----------------------------------------------------------------------------------------------
# Plot and table


def plot(
    configs: dict[str, dict[str, Any]],
    memory: dict[str, Any],
    baselines: dict[str, dict[str, dict[str, Any]]],
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 2, figsize=(15, 10))
    axes = grid.ravel()
    ax = axes[0]
    names = list(configs)
    width = 0.8 / max(1, max((len(c["nodes"]) for c in configs.values()), default=1))
    for i, cname in enumerate(names):
        for j, n in enumerate(configs[cname]["nodes"]):
            v = n.get("idle_fraction")
            x = i - 0.4 + width * (j + 0.5)
            if v is None:
                ax.text(x, 0.01, "n/a", ha="center", rotation=90, fontsize=7)
                continue
            ax.bar(x, v, width * 0.9, color=f"C{j}", label=n["name"] if i == 0 else None)
            ax.annotate(
                f"{v:.1%}",
                (x, v),
                textcoords="offset points",
                xytext=(0, 2),
                ha="center",
                fontsize=7,
            )
    ax.axhline(IDLE_TARGET, color="k", ls="--", lw=1, label=f"target {IDLE_TARGET:.0%} (overlap)")
    ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names])
    ax.set(ylabel="idle / (idle + compute)", title="trainer idle fraction per node")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")

    ax = axes[1]
    labels: list[str] = []
    heights: list[float] = []
    colors: list[str] = []
    for task, variants in baselines.items():
        for variant, base in variants.items():
            labels.append(f"{task}\n{variant.replace('plain_with_daemon_imports', 'plain+imp')}")
            heights.append((base.get("vmhwm_bytes") or 0) / 1e6)
            colors.append("tab:gray" if variant == "plain" else "silver")
        for row in memory.get(task, {}).get("nodes", []):
            if row["config"] not in ("overlap_noloco", SMALL_CONFIG):
                continue
            labels.append(f"{task}\n{row['node']}")
            heights.append(row["vmhwm_bytes"] / 1e6)
            colors.append("tab:blue")
    ax.bar(range(len(labels)), heights, color=colors)
    for i, h in enumerate(heights):
        ax.annotate(
            f"{h:.0f}", (i, h), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=7
        )
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set(ylabel="VmHWM, MB", title="peak resident memory (node: main process only)")
    ax.grid(alpha=0.3, axis="y")

    ax = axes[2]
    xs: list[int] = []
    ys: list[float] = []
    cs: list[str] = []
    ls: list[str] = []
    for task, entry in memory.items():
        for variant in BASELINE_VARIANTS:
            v = entry.get(f"max_overhead_vs_{variant}_copies")
            xs.append(len(xs))
            ys.append(v if v is not None else 0.0)
            cs.append("tab:orange" if entry["meaningful"] else "wheat")
            ls.append(f"{task}\nvs {'plain' if variant == 'plain' else 'plain+imp'}")
    ax.bar(xs, ys, color=cs)
    for x, y in zip(xs, ys, strict=True):
        ax.annotate(
            f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=8
        )
    ax.axhline(MEMORY_TARGET_COPIES, color="k", ls="--", lw=1, label="target 3 copies")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_ylim(0, max([*ys, MEMORY_TARGET_COPIES]) * 3)
    ax.set_xticks(xs, ls, fontsize=8)
    ax.set(ylabel="max over nodes, fp32 model copies", title="daemon memory overhead")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")

    ax = axes[3]
    shown = SMALL_CONFIG if SMALL_CONFIG in configs else next(iter(configs), None)
    if shown is not None:
        task = configs[shown]["config"]["task"]
        for j, n in enumerate(configs[shown]["nodes"]):
            points = n.get("memory_timeline") or []
            ax.plot([p[0] for p in points], [p[1] for p in points], color=f"C{j}", label=n["name"])
            rounds = [p for p in points if p[3] is not None]
            for prev, cur in itertools.pairwise(rounds):
                if cur[3] != prev[3]:
                    ax.axvline(cur[0], color=f"C{j}", lw=0.5, alpha=0.4)
        for variant, style in zip(BASELINE_VARIANTS, ("--", ":"), strict=True):
            hwm = baselines.get(task, {}).get(variant, {}).get("vmhwm_bytes")
            if hwm:
                ax.axhline(hwm / 1e6, color="k", ls=style, lw=1, label=f"{variant} VmHWM")
        copy_mb = (memory.get(task, {}).get("fp32_copy_bytes") or 0) / 1e6
        ax.set(
            xlabel="seconds since the node started (thin lines: an outer step counted)",
            ylabel="VmRSS, MB",
            title=f"{shown}: node RSS over time (1 fp32 copy = {copy_mb:.1f} MB)",
        )
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _f(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(out: dict[str, Any]) -> None:
    err = sys.stderr
    print(
        f"{'config':16s} {'node':5s} {'idle':>6s} {'sent MB':>8s} {'recv MB':>8s} "
        f"{'ok/solo/fail':>12s} {'rounds':>6s} {'exch':>4s} {'loss':>6s} {'HWM MB':>7s} "
        f"{'DHT MB':>7s} {'p2pd MB':>7s}",
        file=err,
    )
    for cname, c in out["configs"].items():
        if c["error"]:
            print(f"{cname:16s} ERROR {c['error'][:200]}", file=err)
        for n in c["nodes"]:
            ex = n.get("exchanges") or {}
            counts = "/".join(str(int(ex.get(k, 0))) for k in ("ok", "solo", "failed"))
            print(
                f"{cname:16s} {n['name']:5s} {_f(n.get('idle_fraction'), '6.1%')} "
                f"{_f((n.get('sent_bytes') or 0) / 1e6, '8.2f')} "
                f"{_f((n.get('received_bytes') or 0) / 1e6, '8.2f')} {counts:>12s} "
                f"{n['log']['rounds_done']:6d} {n['log']['rounds_exchanged']:4d} "
                f"{_f(n.get('final_loss'), '6.3f')} "
                f"{_f((n.get('vmhwm_bytes') or 0) / 1e6, '7.0f')} "
                f"{_f(n['dht_vmhwm_bytes'] / 1e6, '7.0f')} "
                f"{_f(n['p2pd_vmhwm_bytes'] / 1e6, '7.0f')}",
                file=err,
            )
    for task, variants in out["baselines"].items():
        for variant, b in variants.items():
            print(
                f"baseline {task} {variant}: VmHWM {_f((b.get('vmhwm_bytes') or 0) / 1e6, '.0f')}"
                f" MB{' ERROR ' + b['error'][:200] if b.get('error') else ''}",
                file=err,
            )
    for task, entry in out["memory"].items():
        print(
            f"memory {task}: {entry['parameters']} params, overhead max "
            f"{_f(entry.get('max_overhead_vs_plain_copies'), '.1f')} copies vs plain, "
            f"{_f(entry.get('max_overhead_vs_plain_with_daemon_imports_copies'), '.1f')} "
            f"vs plain+imports",
            file=err,
        )
    err.flush()
    print_checks(out["checks"], out["check_notes"])


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with ``--role plain``, the baseline). Returns the exit status."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 nodes, 8 rounds of 20 steps, no small")
    p.add_argument("--json", default=None, help="where to write the JSON results (required)")
    p.add_argument("--png", default=None, help="plot path (default: the JSON path with .png)")
    p.add_argument("--nodes", type=int, default=None, help="nodes per tiny configuration")
    p.add_argument("--rounds", type=int, default=None, help="rounds per tiny configuration")
    p.add_argument("--inner-steps", type=int, default=None, help="H of the tiny configurations")
    p.add_argument(
        "--max-upload-mbps",
        type=float,
        default=MAX_UPLOAD_MBPS,
        help="every node's upload cap, Mbit/s (0: none)",
    )
    p.add_argument("--max-bytes", type=int, default=MAX_BYTES, help="training bytes per node")
    p.add_argument("--match-deadline", type=float, default=MATCH_DEADLINE_S)
    p.add_argument("--threads", type=int, default=THREADS, help="torch threads per node")
    p.add_argument("--no-small", action="store_true", help="skip the --task small configuration")
    p.add_argument(
        "--small-sync",
        choices=("noloco", "diloco", "ef"),
        default="noloco",
        help="sync mode of the --task small (memory) configuration",
    )
    p.add_argument(
        "--small-task",
        choices=("small", "base"),
        default="small",
        help="the model of the memory configuration (base: 114M parameters)",
    )
    p.add_argument("--small-batch-size", type=int, default=None, help="its task's batch size")
    p.add_argument("--small-seq-len", type=int, default=None, help="its task's sequence length")
    p.add_argument("--small-nodes", type=int, default=SMALL_NODES)
    p.add_argument("--small-rounds", type=int, default=SMALL_ROUNDS)
    p.add_argument("--small-inner-steps", type=int, default=SMALL_INNER_STEPS)
    p.add_argument("--small-match-deadline", type=float, default=SMALL_MATCH_DEADLINE_S)
    p.add_argument(
        "--configs",
        default=",".join(c for c, _, _ in TINY_CONFIGS),
        help="comma-separated subset of the tiny configurations",
    )
    p.add_argument("--config-timeout", type=float, default=None, help="seconds per swarm")
    p.add_argument(
        "--join-from-ready-file",
        action="store_true",
        help="start the joiners only once node0 wrote its ready file (node0 gets a head start)",
    )
    p.add_argument("--log-dir", default=None, help="keep the node logs here (default: temp)")
    p.add_argument("--note", default=None, help="free text kept in the JSON header")
    # The plain-training baseline, started by the benchmark itself.
    p.add_argument("--role", choices=("plain",), default=None, help=argparse.SUPPRESS)
    p.add_argument("--task", default="tiny", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=SEED, help=argparse.SUPPRESS)
    p.add_argument("--daemon-imports", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--seq-len", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.role == "plain":
        sizes = {
            k: v for k, v in (("batch_size", a.batch_size), ("seq_len", a.seq_len)) if v is not None
        }
        return plain_main(a.task, a.max_bytes, a.steps, a.threads, a.seed, a.daemon_imports, sizes)
    if a.json is None:
        p.error("--json is required")
    nodes = a.nodes or (QUICK_NODES if a.quick else FULL_NODES)
    rounds = a.rounds or (QUICK_ROUNDS if a.quick else FULL_ROUNDS)
    inner = a.inner_steps or (QUICK_INNER_STEPS if a.quick else FULL_INNER_STEPS)
    if nodes < 2 or rounds < 1 or inner < 1:
        p.error("--nodes must be >= 2, --rounds and --inner-steps >= 1")
    wanted = [c.strip() for c in a.configs.split(",") if c.strip()]
    known = {c for c, _, _ in TINY_CONFIGS}
    if set(wanted) - known:
        p.error(
            f"unknown configurations {sorted(set(wanted) - known)}; choose from {sorted(known)}"
        )
    if a.config_timeout is None:
        a.config_timeout = QUICK_CONFIG_TIMEOUT_S if a.quick else FULL_CONFIG_TIMEOUT_S
    specs = [
        Config(c, sync, blocking, "tiny", nodes, rounds, inner, a.match_deadline)
        for c, sync, blocking in TINY_CONFIGS
        if c in wanted
    ]
    with_small = not (a.quick or a.no_small)
    if with_small:
        small_sizes = (("--batch-size", a.small_batch_size), ("--seq-len", a.small_seq_len))
        specs.append(
            Config(
                SMALL_CONFIG,
                a.small_sync,
                False,
                a.small_task,
                a.small_nodes,
                a.small_rounds,
                a.small_inner_steps,
                a.small_match_deadline,
                tuple(x for flag, v in small_sizes if v is not None for x in (flag, str(v))),
            )
        )

    print(
        f"swarm benchmark ({'quick' if a.quick else 'full'}): {', '.join(s.name for s in specs)}; "
        f"tiny: {nodes} nodes x {rounds} rounds x {inner} steps; cap {a.max_upload_mbps:g} Mbit/s;"
        f" load {os.getloadavg()[0]:.2f}",
        file=sys.stderr,
        flush=True,
    )
    started = time.perf_counter()
    load_before = os.getloadavg()
    source = _source("locoswarm", "locoswarm")
    baselines: dict[str, dict[str, dict[str, Any]]] = {}
    configs: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        if a.log_dir:
            workdir = Path(a.log_dir)
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="swarm-bench-")))
        tasks = {s.task: (s.rounds * s.inner_steps, s.task_args) for s in reversed(specs)}
        for task, (steps, task_args) in tasks.items():
            t0 = time.perf_counter()
            baselines[task] = run_baselines(task, steps, a.max_bytes, a.threads, task_args)
            print(
                f"  baseline {task} ({steps} steps): "
                + ", ".join(
                    f"{v} {_f((r.get('vmhwm_bytes') or 0) / 1e6, '.0f')} MB"
                    for v, r in baselines[task].items()
                )
                + f" in {time.perf_counter() - t0:.1f}s",
                file=sys.stderr,
                flush=True,
            )
        for spec in specs:
            result = run_config(spec, a, workdir)
            configs[spec.name] = result
            s = result["summary"]
            print(
                f"  {spec.name}: idle mean {_f(s['idle_fraction_mean'], '.1%')} max "
                f"{_f(s['idle_fraction_max'], '.1%')}, {s['rounds_exchanged']} exchanged rounds, "
                f"{s['sent_bytes'] / 1e6:.1f} MB sent, in {result['wall_s']:.1f}s"
                f"{' ERROR ' + result['error'] if result['error'] else ''}",
                file=sys.stderr,
                flush=True,
            )
    source_after = _source("locoswarm", "locoswarm")
    if source_after != source:
        print("  WARNING: locoswarm/ changed during the run (see header.source)", file=sys.stderr)
    memory = memory_report(configs, baselines)
    summary = summarise(configs, memory)
    out: dict[str, Any] = {
        "header": {
            "mode": "quick" if a.quick else "full",
            "nodes": nodes,
            "rounds": rounds,
            "inner_steps": inner,
            "configs": {
                s.name: {
                    "task": s.task,
                    "nodes": s.nodes,
                    "rounds": s.rounds,
                    "inner_steps": s.inner_steps,
                    "match_deadline_s": s.match_deadline_s,
                    "sync": s.sync,
                    "blocking": s.blocking,
                }
                for s in specs
            },
            "max_upload_mbps": a.max_upload_mbps or None,
            "max_bytes": a.max_bytes,
            "match_deadline_s": a.match_deadline,
            "threads": a.threads,
            "seed": SEED,
            "log_every_s": LOG_EVERY_S,
            "poll_s": POLL_S,
            "host": HOST,
            "cpu_count": os.cpu_count(),
            "versions": {
                "python": platform.python_version(),
                "locoswarm": _version("locoswarm"),
                "torch": _version("torch"),
                "hivemind": _version("hivemind"),
                "grpcio": _version("grpcio"),
                "protobuf": _version("protobuf"),
                "prometheus_client": _version("prometheus-client"),
                "uvloop": _version("uvloop"),
            },
            "machine": platform.machine(),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "source": source,
            "source_after": source_after,
            "tree_changed_during_run": source_after != source,
            "note": a.note,
            "loadavg_before": list(load_before),
            "loadavg_after": list(os.getloadavg()),
            "definitions": {
                "idle_fraction": "locoswarm_trainer_idle_seconds_total / (idle + "
                "locoswarm_trainer_compute_seconds_total), last scrape before the node stopped",
                "metrics_age_s": "seconds between that scrape and the node's exit being seen; "
                "the daemon adds compute/idle seconds to the counters once per --log-every",
                "vmhwm_bytes": "VmHWM of the node's main process (/proc/<pid>/status), last read "
                "before it exited; DHT process and p2pd reported separately",
                "overhead": "node VmHWM - baseline VmHWM; copies = overhead / (parameters * 4)",
                "at_ready_over_*_built_bytes": "node VmHWM at its ready file (model, optimizer "
                "and outer state built, no round yet) - the baseline's VmHWM after building the "
                "task and optimizer (before its first step): the part of the overhead that is "
                "there before training",
                "memory_timeline": "[seconds since start, VmRSS MB, VmHWM MB, outer step of the "
                "last scrape], the highest-RSS sample of each of 40 equal runs of polls",
                "baselines": "python -m bench.swarm --role plain: the node's task, AdamW, the "
                "same batch and steps, no daemon; plain_with_daemon_imports also imports "
                "locoswarm.node.daemon/run, hivemind, grpc, uvloop and prometheus_client first "
                "and applies the node's C allocator settings (trainer.malloc_*)",
                "idle_fraction_swarm": "the same over the counter deltas from the first scrape "
                "once every node of the swarm was up (ready file written) to the last scrape",
                "metrics_missing_rounds": "rounds in the node's log minus outer steps counted in "
                "its last scrape (what the final scrape missed)",
                "exchanged_round_s": "duration of an exchanged round from the log line "
                "(view refresh, prepare, matchmaking incl. waiting for the partner's boundary, "
                "transfer, apply)",
                "exchange_s_estimate": "the smallest per-node median exchanged_round_s: the "
                "side that reaches the boundary last hardly waits, so this is about the "
                "exchange itself",
                "transfer_s_at_cap": "parameters * 4 bytes / upload cap (one direction)",
                "inner_phase_s": "compute_s / inner_steps * H from the metrics",
                "exchange_shorter_than_inner_phase": "exchange_s_estimate < median inner_phase_s",
                "dht_vmhwm_bytes": "largest VmHWM of the node's DHT processes (a failed bootstrap "
                "attempt leaves one more); VmHWM counts pages shared with the parent after fork",
            },
        },
        "baselines": baselines,
        "configs": configs,
        "memory": memory,
        **summary,
        "wall_s": time.perf_counter() - started,
    }
    json_path = Path(a.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(_finite(out), indent=1, default=str))
    png = Path(a.png) if a.png else json_path.with_suffix(".png")
    plot(configs, memory, baselines, png)
    print_table(out)
    print(f"wrote {json_path} and {png} in {out['wall_s']:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
