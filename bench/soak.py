"""Soak test: a swarm of real ``locoswarm run`` daemons on 127.0.0.1 under churn, for minutes.

Usage: python -m bench.soak [--minutes 30] [--nodes 6] [--kill-every-s 30] --json PATH [--png PATH]

Node 0 starts the swarm; the others ``--join`` its first DHT multiaddr. Every node runs with
``--host 127.0.0.1 --threads 1 --max-bytes 200000 --inner-steps 20 --match-deadline 3 --seed 0
--log-every 1 --metrics-port 0``, its own ``--checkpoint-dir`` with ``--checkpoint-every 5``, and
the fault suite's fast timeouts (``FAST``), each in its own session (process group). The soak
clock starts once every node wrote its ready file.

Churn: every ``--kill-every-s`` seconds one node is picked at random among the live, ready ones
(any node, node 0 included) and its whole process group gets SIGKILL (the node, its DHT process
and that one's ``p2pd``). It is restarted at once with the same checkpoint directory (it resumes
from its last checkpoint, or late-joins when it had none) and ``--join`` the first multiaddr of
another node that is live and ready at that moment. A node that exits on its own is restarted
the same way and counted as an unexpected exit.

Measured (rounds count when logged inside the soak window, from the moment every node was
ready to the end of ``--minutes``; rounds of the start-up and of the final stop are kept in the
JSON per incarnation, ``rounds``, but not counted):

* exchanges per node, ok / failed / solo: from the logs ("round N: exchanged", "solo (failed)",
  "solo (solo)"), summed over a node's incarnations (the source of truth), and from the last
  ``/metrics`` scrape of each incarnation (scraped every ``--sample-every-s``), summed the same way
  (a killed incarnation's last scrape is up to one sampling interval old);
* loss: per node and round from the log lines (their timestamps place them in the run); mean
  loss over all nodes per quarter of the run, and per node;
* resident memory (``VmRSS`` of the node process, and of its whole process group) and open file
  descriptors (psutil ``num_fds``) every ``--sample-every-s``; growth per incarnation after the
  warm-up: (last - value at warm-up) / value at warm-up, for incarnations that lived at least
  ``--warmup-s`` plus ``--min-span-s`` (defaults: 120 s and 60 s, both at most a quarter of the
  run);
* per kill: how many rounds the restarted incarnation logged up to and including its first
  exchange, and the seconds from restart to that exchange (undetermined when the run ended
  before it logged an exchange or 2 rounds);
* leftovers: every process seen in a node's process group or below a node (pid and start time)
  must be gone after the end. The nodes are stopped gracefully first (SIGTERM, as an operator
  would), and what is still alive then is reported; then every process group gets SIGKILL. New
  ``p2pd`` processes (``procs.named("p2pd")``) are attributed to us when they were seen in our
  groups; others (e.g. another benchmark's) are listed apart.

Checks: no leftover processes; resident memory growth < 5% after warm-up; loss falling (mean of
the last quarter below the first); every killed node back in exchanges within 2 rounds of its
restart. Writes JSON and a PNG; prints a summary to stderr. Every process group is killed at the
end, on errors and on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.common import finite as _finite
from bench.common import version as _version
from locoswarm.node import processes as procs

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]

NODE_ARGS = [
    "--host",
    HOST,
    "--threads",
    "1",
    "--max-bytes",
    "200000",
    "--inner-steps",
    "20",
    "--match-deadline",
    "3",
    "--seed",
    "0",
    "--log-every",
    "1",
    "--metrics-port",
    "0",
    "--checkpoint-every",
    "5",
]
FAST = ["--preset", "fast-failure-detection"]  # the fault suite's quick failure detection

POLL_S = 0.5
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 45.0
SCRAPE_TIMEOUT_S = 2.0
LOG_TAIL_CHARS = 2000

RSS_GROWTH_TARGET = 0.05  # issue 14
RECOVERY_ROUNDS_TARGET = 2

ROUND_RE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ \S+: round (\d+): "
    r"(exchanged|solo \((\w+)\)), train loss ([^,\s]+)(?:, [a-z ]+ [^,\s]+)*, ([\d.]+)s",
    re.M,
)
RESUMED_RE = re.compile(r"resumed from \S+ at round (\d+), step (\d+)")
LATE_JOIN_RE = re.compile(r"late join: fetched the outer weights of round (\d+)")
CATCH_UP_RE = re.compile(r"round (\d+): the swarm is at round (\d+); catching up")
CHECKPOINT_RE = re.compile(r"checkpoint \S+ at round (\d+), step (\d+)")
EXCHANGES_RE = re.compile(r'^locoswarm_sync_exchanges_total\{result="(\w+)"\} (\S+)$', re.M)
REJECTED_RE = re.compile(r'^locoswarm_protocol_rejected_total\{reason="(\w+)"\} (\S+)$', re.M)
GAUGE_RE = {
    "outer_step": re.compile(r"^locoswarm_sync_outer_step (\S+)$", re.M),
    "loss": re.compile(r"^locoswarm_trainer_loss (\S+)$", re.M),
    "peers_live": re.compile(r"^locoswarm_peers_live (\S+)$", re.M),
}

# ----------------------------------------------------------------------------------------------
# Process helpers (psutil)


def _identity(pid: int) -> tuple[psutil.Process, str] | None:
    """(the process, its command name) of a live process; None if gone or a zombie.

    ``psutil.Process`` compares equal by pid and start time, so a reused pid is another process.
    """
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc, proc.name()
    except psutil.Error:
        return None


def _rss(pid: int) -> int | None:
    """Resident memory (VmRSS) of a live process, in bytes."""
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return None


def _fds(pid: int) -> int | None:
    """Open file descriptors of a live process."""
    try:
        return psutil.Process(pid).num_fds()
    except psutil.Error:
        return None


def _still_alive(ids: set[tuple[psutil.Process, str]], timeout_s: float) -> list[dict[str, Any]]:
    """Those of ``ids`` still alive (the same process: pid and start time) after ``timeout_s``."""
    left = procs.wait_gone({proc.pid for proc, _ in ids}, timeout_s)
    return [
        {"pid": proc.pid, "name": name}
        for proc, name in sorted(ids, key=lambda ident: (ident[0].pid, ident[1]))
        if proc.pid in left and _identity(proc.pid) == (proc, name)
    ]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if math.isfinite(v)]
    return statistics.fmean(values) if values else None


# ----------------------------------------------------------------------------------------------
# One process of one node


@dataclass
class Incarnation:
    slot: int
    number: int
    proc: subprocess.Popen[bytes]
    log: Path
    ready: Path
    join: str | None
    join_node: str | None
    started_t: float
    info: dict[str, Any] | None = None
    ready_t: float | None = None
    ended_t: float | None = None
    end: str | None = None  # killed | stopped | exited | cleanup
    exit_code: int | None = None
    samples: list[tuple[float, int | None, int | None, int, int]] = field(default_factory=list)
    """(t, node VmRSS, node fds, process-group VmRSS, process-group fds)."""
    seen: set[tuple[psutil.Process, str]] = field(default_factory=set)
    metrics: dict[str, Any] = field(default_factory=dict)
    scrapes: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def live(self) -> bool:
        return self.proc.poll() is None

    def check_ready(self, now: float) -> bool:
        if self.info is None:
            with contextlib.suppress(OSError, ValueError):
                text = self.ready.read_text().strip()
                if text:
                    self.info = dict(json.loads(text))
                    self.ready_t = now
        return self.info is not None

    def join_address(self) -> str | None:
        maddrs = (self.info or {}).get("maddrs") or []
        return str(maddrs[0]) if maddrs else None

    def remember_processes(self) -> None:
        """Note every process in our group and below us (to check they are gone at the end)."""
        for pid in procs.in_group(self.pid) | procs.descendants(self.pid) | {self.pid}:
            ident = _identity(pid)
            if ident is not None:
                self.seen.add(ident)

    def sample(self, now: float) -> None:
        rss, fds = _rss(self.pid), _fds(self.pid)
        others = procs.in_group(self.pid) - {self.pid}
        group_rss = (rss or 0) + sum(r for p in others if (r := _rss(p)) is not None)
        group_fds = (fds or 0) + sum(f for p in others if (f := _fds(p)) is not None)
        self.samples.append((now, rss, fds, group_rss, group_fds))
        self.remember_processes()

    def scrape(self) -> None:
        url = (self.info or {}).get("metrics")
        if not url:
            return
        try:
            with urllib.request.urlopen(str(url), timeout=SCRAPE_TIMEOUT_S) as reply:
                text = reply.read().decode()
        except (OSError, ValueError):
            return
        out: dict[str, Any] = {
            "exchanges": {k: float(v) for k, v in EXCHANGES_RE.findall(text)},
            "rejected": {k: float(v) for k, v in REJECTED_RE.findall(text)},
        }
        for key, pattern in GAUGE_RE.items():
            found = pattern.search(text)
            out[key] = float(found.group(1)) if found else None
        self.metrics = out
        self.scrapes += 1

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def parse_log(text: str, t0: float) -> dict[str, Any]:
    """Rounds (t since the soak started, round, result, loss), resume, late join, catch-ups."""
    rounds = []
    for stamp, r, _, reason, loss, _secs in ROUND_RE.findall(text):
        when = dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp() - t0
        result = reason or "ok"  # solo (failed) / solo (solo)
        rounds.append((round(when, 3), int(r), result, float(loss)))
    resumed = RESUMED_RE.search(text)
    late = LATE_JOIN_RE.search(text)
    checkpoints = [int(r) for r, _ in CHECKPOINT_RE.findall(text)]
    return {
        "rounds": rounds,
        "resumed_round": int(resumed.group(1)) if resumed else None,
        "late_join_round": int(late.group(1)) if late else None,
        "catch_ups": [[int(a), int(b)] for a, b in CATCH_UP_RE.findall(text)],
        "last_checkpoint_round": checkpoints[-1] if checkpoints else None,
    }


def _count(rounds: list[tuple[float, int, str, float]]) -> dict[str, int]:
    out = {"ok": 0, "failed": 0, "solo": 0}
    for _, _, result, _ in rounds:
        out[result] = out.get(result, 0) + 1
    return out


# ----------------------------------------------------------------------------------------------
# The swarm


class Swarm:
    def __init__(self, a: argparse.Namespace, work: Path) -> None:
        self.a = a
        self.work = work
        self.rng = random.Random(a.seed)
        self.t0 = time.time()  # moved to the soak start once every node is ready
        self.slots: list[list[Incarnation]] = [[] for _ in range(a.nodes)]
        self.kills: list[dict[str, Any]] = []
        self.unexpected_exits: list[dict[str, Any]] = []
        self.kill_leftovers: list[dict[str, Any]] = []

    def now(self) -> float:
        return time.time() - self.t0

    def current(self, slot: int) -> Incarnation:
        return self.slots[slot][-1]

    def all_incarnations(self) -> list[Incarnation]:
        return [inc for incs in self.slots for inc in incs]

    def start(self, slot: int, join: Incarnation | None) -> Incarnation:
        number = len(self.slots[slot])
        name = f"node{slot}"
        log = self.work / f"{name}.{number}.log"
        ready = self.work / f"{name}.{number}.json"
        ckpt = self.work / f"{name}.ckpt"
        address = join.join_address() if join is not None else None
        cmd = [
            sys.executable,
            "-m",
            "locoswarm",
            "run",
            *NODE_ARGS,
            *FAST,
            "--checkpoint-dir",
            str(ckpt),
            "--ready-file",
            str(ready),
            *(["--join", address] if address else []),
        ]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        inc = Incarnation(
            slot=slot,
            number=number,
            proc=proc,
            log=log,
            ready=ready,
            join=address,
            join_node=f"node{join.slot}" if join is not None else None,
            started_t=self.now(),
        )
        self.slots[slot].append(inc)
        inc.remember_processes()
        return inc

    def wait_ready(self, incs: list[Incarnation], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            pending = [inc for inc in incs if not inc.check_ready(self.now())]
            if not pending:
                return
            for inc in pending:
                if not inc.live:
                    raise RuntimeError(
                        f"node{inc.slot} exited {inc.proc.returncode} before it was ready:\n"
                        + inc.text()[-LOG_TAIL_CHARS:]
                    )
                inc.remember_processes()
            if time.monotonic() > deadline:
                names = ", ".join(f"node{inc.slot}" for inc in pending)
                raise RuntimeError(f"not ready after {timeout_s:.0f}s: {names}")
            time.sleep(POLL_S)

    def kill(self, inc: Incarnation, end: str) -> None:
        """SIGKILL the incarnation's process group; wait for the group to be gone."""
        inc.remember_processes()
        group = procs.in_group(inc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(inc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            inc.proc.wait(timeout=10)
        if inc.ended_t is None:
            inc.ended_t = self.now()
            inc.end = end
            inc.exit_code = inc.proc.returncode
        left = procs.wait_gone(group)
        if left:
            self.kill_leftovers.append({"node": f"node{inc.slot}", "pids": sorted(left)})

    def live_ready(self, exclude: int | None = None) -> list[Incarnation]:
        return [
            self.current(s)
            for s in range(len(self.slots))
            if s != exclude and self.current(s).live and self.current(s).info is not None
        ]

    def churn(self) -> bool:
        """Kill a random live, ready node and restart it; False when no pair qualifies now."""
        candidates = [inc for inc in self.live_ready() if self.live_ready(exclude=inc.slot)]
        if not candidates:
            return False
        victim = self.rng.choice(candidates)
        target = self.rng.choice(self.live_ready(exclude=victim.slot))
        killed_at = self.now()
        self.kill(victim, "killed")
        fresh = self.start(victim.slot, target)
        self.kills.append(
            {
                "node": f"node{victim.slot}",
                "slot": victim.slot,
                "killed_t": round(killed_at, 3),
                "killed_incarnation": victim.number,
                "restarted_incarnation": fresh.number,
                "restarted_t": round(fresh.started_t, 3),
                "joined_through": target.slot,
            }
        )
        return True

    def restart_exited(self) -> None:
        """A node that exited on its own: note it and start it again."""
        for slot in range(len(self.slots)):
            inc = self.current(slot)
            if inc.live or inc.ended_t is not None:
                continue
            inc.ended_t, inc.end, inc.exit_code = self.now(), "exited", inc.proc.returncode
            self.kill(inc, "exited")  # its group, in case its children outlived it
            self.unexpected_exits.append(
                {
                    "node": f"node{slot}",
                    "incarnation": inc.number,
                    "t": round(inc.ended_t, 3),
                    "exit_code": inc.exit_code,
                    "log_tail": inc.text()[-LOG_TAIL_CHARS:],
                }
            )
            targets = self.live_ready(exclude=slot)
            self.start(slot, self.rng.choice(targets) if targets else None)

    def sample(self) -> None:
        now = self.now()
        for slot in range(len(self.slots)):
            inc = self.current(slot)
            if inc.live:
                inc.check_ready(now)
                inc.sample(now)
                inc.scrape()

    def stop(self) -> dict[str, Any]:
        """SIGTERM every live node, wait, report what is left; then SIGKILL every group."""
        live = [inc for inc in self.all_incarnations() if inc.live]
        for inc in live:
            inc.remember_processes()
            with contextlib.suppress(ProcessLookupError):
                inc.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for inc in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                inc.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            if inc.proc.poll() is not None and inc.ended_t is None:
                inc.ended_t, inc.end, inc.exit_code = self.now(), "stopped", inc.proc.returncode
        after_graceful = _still_alive(self.seen(), 10)
        self.cleanup()
        return {
            "not_stopped_by_sigterm": [f"node{i.slot}" for i in live if i.end != "stopped"],
            "stop_exit_codes": {f"node{i.slot}": i.exit_code for i in live},
            "after_graceful_stop": after_graceful,
        }

    def seen(self) -> set[tuple[psutil.Process, str]]:
        return set().union(*(inc.seen for inc in self.all_incarnations()))

    def cleanup(self) -> None:
        """SIGKILL every process group we started (idempotent; for errors and Ctrl-C too)."""
        for inc in self.all_incarnations():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(inc.pid, signal.SIGKILL)
        for inc in self.all_incarnations():
            with contextlib.suppress(subprocess.TimeoutExpired):
                inc.proc.wait(timeout=10)
            if inc.ended_t is None:
                inc.ended_t, inc.end, inc.exit_code = self.now(), "cleanup", inc.proc.returncode


# ----------------------------------------------------------------------------------------------
# Reporting


def _quarters(points: list[tuple[float, float]], duration: float) -> list[float | None]:
    """Mean of ``(t, value)`` per quarter of [0, duration] (earlier points count in the first)."""
    bins: list[list[float]] = [[], [], [], []]
    for t, v in points:
        index = min(3, max(0, int(4 * t / duration))) if duration > 0 else 0
        bins[index].append(v)
    return [_mean(b) for b in bins]


def _at(samples: list[tuple[float, int]], t: float) -> tuple[float, int] | None:
    """The first sample at or after ``t`` with a value."""
    for when, value in samples:
        if when >= t:
            return when, value
    return None


def _growth(
    samples: list[tuple[float, int | None]], start: float, warmup: float, span: float
) -> dict[str, Any]:
    values = [(t, v) for t, v in samples if v is not None]
    out: dict[str, Any] = {
        "first": values[0][1] if values else None,
        "max": max((v for _, v in values), default=None),
        "last": values[-1][1] if values else None,
        "at_warmup": None,
        "growth": None,
        "measured_s": None,
    }
    base = _at(values, start + warmup)
    if base is not None and values[-1][0] - base[0] >= span:
        out["at_warmup"] = base[1]
        out["growth"] = (values[-1][1] - base[1]) / base[1]
        out["measured_s"] = values[-1][0] - base[0]
    return out


def report(
    sw: Swarm, duration: float, warmup: float, span: float, stop: dict[str, Any]
) -> dict[str, Any]:
    nodes: list[dict[str, Any]] = []
    all_losses: list[tuple[float, float]] = []
    by_key: dict[tuple[int, int], dict[str, Any]] = {}
    for slot, incs in enumerate(sw.slots):
        rows = []
        node_rounds: list[tuple[float, int, str, float]] = []
        metrics_total: dict[str, float] = {}
        for inc in incs:
            parsed = parse_log(inc.text(), sw.t0)
            # the soak window only: not the start-up (nodes still joining) nor the stop
            window = [r for r in parsed["rounds"] if 0 <= r[0] <= duration]
            outside = len(parsed["rounds"]) - len(window)
            node_rounds += window
            for k, v in (inc.metrics.get("exchanges") or {}).items():
                metrics_total[k] = metrics_total.get(k, 0.0) + v
            rss = _growth([(s[0], s[1]) for s in inc.samples], inc.started_t, warmup, span)
            group_rss = _growth([(s[0], s[3]) for s in inc.samples], inc.started_t, warmup, span)
            fds = _growth([(s[0], s[2]) for s in inc.samples], inc.started_t, warmup, span)
            row = {
                "incarnation": inc.number,
                "pid": inc.pid,
                "started_t": round(inc.started_t, 3),
                "ready_t": None if inc.ready_t is None else round(inc.ready_t, 3),
                "ended_t": None if inc.ended_t is None else round(inc.ended_t, 3),
                "end": inc.end,
                "exit_code": inc.exit_code,
                "joined": inc.join,
                "joined_through": inc.join_node,
                "peer_id": (inc.info or {}).get("peer_id"),
                "resumed_round": parsed["resumed_round"],
                "late_join_round": parsed["late_join_round"],
                "catch_ups": parsed["catch_ups"],
                "last_checkpoint_round": parsed["last_checkpoint_round"],
                "rounds_in_window": len(window),
                "rounds_outside_window": outside,
                "exchanges_log": _count(window),
                "last_metrics": inc.metrics,
                "scrapes": inc.scrapes,
                "rss_bytes": rss,
                "group_rss_bytes": group_rss,
                "fds": fds,
                "samples": [list(s) for s in inc.samples],
                "rounds": [list(r) for r in parsed["rounds"]],
            }
            by_key[(slot, inc.number)] = {**row, "_rounds": window}
            rows.append(row)
        losses = [(t, loss) for t, _, _, loss in node_rounds]
        all_losses += losses
        nodes.append(
            {
                "name": f"node{slot}",
                "incarnations": rows,
                "restarts": len(incs) - 1,
                "exchanges_log": _count(node_rounds),
                "exchanges_metrics": metrics_total,
                "rounds_in_window": len(node_rounds),
                "loss_quarters": _quarters(losses, duration),
                "last_loss": node_rounds[-1][3] if node_rounds else None,
            }
        )

    kills = []
    for kill in sw.kills:
        old = by_key[(kill["slot"], kill["killed_incarnation"])]
        new = by_key[(kill["slot"], kill["restarted_incarnation"])]
        old_rounds, new_rounds = old["_rounds"], new["_rounds"]
        first_ok = next((i for i, r in enumerate(new_rounds) if r[2] == "ok"), None)
        rounds_to = None if first_ok is None else first_ok + 1
        # undetermined: no exchange yet, and fewer rounds logged than the target before the end
        settled = rounds_to is not None or len(new_rounds) >= RECOVERY_ROUNDS_TARGET
        kills.append(
            {
                **kill,
                "last_round_before_kill": old_rounds[-1][1] if old_rounds else None,
                "last_checkpoint_round": old["last_checkpoint_round"],
                "resumed_round": new["resumed_round"],
                "late_join_round": new["late_join_round"],
                "first_round_after_restart": new_rounds[0][1] if new_rounds else None,
                "ready_after_s": None
                if new["ready_t"] is None
                else round(new["ready_t"] - kill["restarted_t"], 3),
                "rounds_after_restart": len(new_rounds),
                "rounds_to_first_exchange": rounds_to,
                "seconds_to_first_exchange": None
                if first_ok is None
                else round(new_rounds[first_ok][0] - kill["restarted_t"], 3),
                "determined": settled,
                "within_target": (rounds_to is not None and rounds_to <= RECOVERY_ROUNDS_TARGET)
                if settled
                else None,
            }
        )

    totals = {"ok": 0, "failed": 0, "solo": 0}
    for node in nodes:
        for k, v in node["exchanges_log"].items():
            totals[k] = totals.get(k, 0) + v
    rounds_total = sum(totals.values())
    quarters = _quarters(all_losses, duration)

    rows_all = [row for node in nodes for row in node["incarnations"]]
    rss_growths = [
        r["rss_bytes"]["growth"] for r in rows_all if r["rss_bytes"]["growth"] is not None
    ]
    group_growths = [
        r["group_rss_bytes"]["growth"]
        for r in rows_all
        if r["group_rss_bytes"]["growth"] is not None
    ]
    fd_growths = [r["fds"]["growth"] for r in rows_all if r["fds"]["growth"] is not None]
    determined = [k for k in kills if k["determined"]]
    leftover = stop["leftover_after_cleanup"] + stop["after_graceful_stop"]

    checks: dict[str, bool | None] = {
        "no leftover processes": not leftover and not sw.kill_leftovers,
        f"resident memory growth < {RSS_GROWTH_TARGET:.0%} after warm-up": (
            max(rss_growths) < RSS_GROWTH_TARGET if rss_growths else None
        ),
        "loss falling (last quarter mean < first quarter mean)": (
            quarters[3] < quarters[0]
            if quarters[0] is not None and quarters[3] is not None
            else None
        ),
        f"every killed node back in exchanges within {RECOVERY_ROUNDS_TARGET} rounds of restart": (
            all(k["within_target"] for k in determined) if determined else None
        ),
    }
    summary = {
        "duration_s": round(duration, 1),
        "kills": len(sw.kills),
        "unexpected_exits": len(sw.unexpected_exits),
        "rounds": rounds_total,
        "exchanges": totals,
        "ok_fraction": totals["ok"] / rounds_total if rounds_total else None,
        "loss_quarters": quarters,
        "rss_growth_max": max(rss_growths) if rss_growths else None,
        "rss_growth_median": statistics.median(rss_growths) if rss_growths else None,
        "rss_growth_measured_incarnations": len(rss_growths),
        "group_rss_growth_max": max(group_growths) if group_growths else None,
        "fd_growth_max": max(fd_growths) if fd_growths else None,
        "fds_max": max((r["fds"]["max"] or 0 for r in rows_all), default=None),
        "rss_max_bytes": max((r["rss_bytes"]["max"] or 0 for r in rows_all), default=None),
        "recovery_rounds": [k["rounds_to_first_exchange"] for k in kills],
        "recovery_within_target": sum(1 for k in determined if k["within_target"]),
        "recovery_determined": len(determined),
        "recovery_seconds_median": statistics.median(
            [k["seconds_to_first_exchange"] for k in kills if k["seconds_to_first_exchange"]]
        )
        if any(k["seconds_to_first_exchange"] for k in kills)
        else None,
        "leftover_processes": len(leftover),
    }
    return {
        "summary": summary,
        "checks": checks,
        "nodes": nodes,
        "kills": kills,
        "unexpected_exits": sw.unexpected_exits,
        "leftover": {**stop, "after_kills": sw.kill_leftovers},
    }


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    (ax_loss, ax_ex), (ax_rss, ax_fd) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, node in enumerate(data["nodes"]):
        color = colors[i % len(colors)]
        for j, inc in enumerate(node["incarnations"]):
            label = node["name"] if j == 0 else None
            rounds = inc["rounds"]
            ax_loss.plot(
                [r[0] / 60 for r in rounds], [r[3] for r in rounds], ".", ms=3, color=color
            )
            samples = inc["samples"]
            ax_rss.plot(
                [s[0] / 60 for s in samples if s[1]],
                [s[1] / 2**20 for s in samples if s[1]],
                "-",
                color=color,
                label=label,
            )
            ax_fd.plot(
                [s[0] / 60 for s in samples if s[2]],
                [s[2] for s in samples if s[2]],
                "-",
                color=color,
                label=label,
            )
    for kill in data["kills"]:
        for ax in (ax_loss, ax_rss, ax_fd):
            ax.axvline(kill["killed_t"] / 60, color="grey", lw=0.5, alpha=0.5)
    quarters = data["summary"]["loss_quarters"]
    duration = data["summary"]["duration_s"] / 60
    for q, value in enumerate(quarters):
        if value is not None:
            ax_loss.hlines(value, q * duration / 4, (q + 1) * duration / 4, color="k", lw=2)
    ax_loss.set(
        xlabel="minutes", ylabel="train loss", title="loss per round (black: quarter means)"
    )
    ax_rss.set(xlabel="minutes", ylabel="VmRSS, MiB", title="node process resident memory")
    ax_fd.set(xlabel="minutes", ylabel="open fds", title="node process file descriptors")
    ax_rss.legend(fontsize=7)
    names = [n["name"] for n in data["nodes"]]
    bottom = [0] * len(names)
    for result, color in (("ok", "tab:green"), ("failed", "tab:red"), ("solo", "tab:grey")):
        values = [n["exchanges_log"].get(result, 0) for n in data["nodes"]]
        ax_ex.bar(names, values, bottom=bottom, color=color, label=result)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax_ex.set(ylabel="rounds", title="rounds by result (logs, all incarnations)")
    ax_ex.legend(fontsize=7)
    checks = data["checks"]
    fig.suptitle(
        f"locoswarm soak: {len(names)} nodes, {duration:.1f} min, {len(data['kills'])} kills; "
        + "; ".join(f"{k}: {v}" for k, v in checks.items()),
        fontsize=8,
        wrap=True,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print_summary(data: dict[str, Any]) -> None:
    s = data["summary"]
    err = sys.stderr
    print(
        f"soak: {s['duration_s']}s, {s['kills']} kills, {s['rounds']} rounds {s['exchanges']}",
        file=err,
    )
    print(f"  loss quarters {s['loss_quarters']}", file=err)
    print(
        f"  VmRSS growth max {s['rss_growth_max']} over "
        f"{s['rss_growth_measured_incarnations']} incarnations; fd growth max {s['fd_growth_max']}",
        file=err,
    )
    print(f"  rounds to first exchange after restart: {s['recovery_rounds']}", file=err)
    for name, ok in data["checks"].items():
        print(f"  [{'ok' if ok else 'FAIL' if ok is False else '--'}] {name}", file=err)


# ----------------------------------------------------------------------------------------------


def soak(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    duration = a.minutes * 60
    warmup = a.warmup_s if a.warmup_s is not None else min(120.0, duration / 4)
    span = a.min_span_s if a.min_span_s is not None else min(60.0, duration / 4)
    p2pd_before = procs.named("p2pd")
    sw = Swarm(a, work)
    error: str | None = None
    interrupted = False
    stop: dict[str, Any] = {"after_graceful_stop": [], "not_stopped_by_sigterm": []}
    started = time.time()
    try:
        first = sw.start(0, None)
        sw.wait_ready([first], READY_TIMEOUT_S)
        others = [sw.start(slot, first) for slot in range(1, a.nodes)]
        sw.wait_ready(others, READY_TIMEOUT_S)
        shift = time.time() - sw.t0
        sw.t0 += shift  # the soak clock starts now
        for inc in sw.all_incarnations():
            inc.started_t -= shift
            inc.ready_t = None if inc.ready_t is None else inc.ready_t - shift
        next_kill = a.kill_every_s if a.kill_every_s > 0 else math.inf
        next_sample = 0.0
        while sw.now() < duration:
            sw.restart_exited()
            if sw.now() >= next_kill:
                next_kill = sw.now() + (a.kill_every_s if sw.churn() else POLL_S)
            if sw.now() >= next_sample:
                sw.sample()
                next_sample = sw.now() + a.sample_every_s
            for inc in sw.all_incarnations():
                if inc.live:
                    inc.check_ready(sw.now())
            time.sleep(POLL_S)
        sw.sample()
        stop = sw.stop()
    except KeyboardInterrupt:
        interrupted = True
        error = "interrupted"
    except Exception as exc:  # noqa: BLE001 - reported in the JSON, then re-checked below
        error = f"{type(exc).__name__}: {exc}"
    finally:
        sw.cleanup()
    seen = sw.seen()
    leftover = _still_alive(seen, 15)
    groups = {inc.pid for inc in sw.all_incarnations()}
    groups_left = sorted(set().union(set(), *(procs.in_group(g) for g in groups)))
    leftover += [{"pid": p, "name": "in a node's process group"} for p in groups_left]
    ours = {proc.pid for proc, name in seen if name == "p2pd"}
    new_p2pd = procs.named("p2pd") - p2pd_before
    mine = {p for p in new_p2pd if p in ours or _pgid(p) in groups}
    stop = {
        **stop,
        "leftover_after_cleanup": leftover,
        "p2pd_seen": len(ours),
        "processes_seen_by_name": {
            n: sum(1 for i in seen if i[1] == n) for n in {i[1] for i in seen}
        },
        "p2pd_new_still_running_ours": sorted(mine),
        "p2pd_new_still_running_not_ours": sorted(new_p2pd - mine),
    }
    data = report(sw, max(1e-9, min(duration, sw.now())), warmup, span, stop)
    data["header"] = {
        "command": "python -m bench.soak " + " ".join(a.argv),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nodes": a.nodes,
        "minutes": a.minutes,
        "kill_every_s": a.kill_every_s,
        "sample_every_s": a.sample_every_s,
        "warmup_s": warmup,
        "min_span_s": span,
        "seed": a.seed,
        "startup_s": round(sw.t0 - started, 1),
        "node_args": [*NODE_ARGS, *FAST, "--checkpoint-dir", "<per node>"],
        "kill": "SIGKILL of the process group of a random live node (node 0 included); "
        "restart with the same checkpoint dir, --join a live node",
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "versions": {
            "python": platform.python_version(),
            **{d: _version(d) for d in ("torch", "hivemind", "grpcio")},
        },
    }
    data["error"] = error
    data["interrupted"] = interrupted
    order = ["header", "error", "interrupted", "checks", "summary", "kills", "leftover"]
    return {k: data[k] for k in order} | {k: v for k, v in data.items() if k not in order}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0, help="soak length (after start-up)")
    p.add_argument("--nodes", type=int, default=6)
    p.add_argument("--kill-every-s", type=float, default=30.0, help="0: no churn")
    p.add_argument("--json", required=True, type=Path, help="where to write the results")
    p.add_argument("--png", type=Path, default=None, help="plot (default: the JSON with .png)")
    p.add_argument("--sample-every-s", type=float, default=5.0, help="memory/fd/metrics period")
    p.add_argument("--warmup-s", type=float, default=None, help="default min(120, run/4)")
    p.add_argument("--min-span-s", type=float, default=None, help="default min(60, run/4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    p.add_argument("--log-dir", type=Path, default=None, help="keep node logs here (default: temp)")
    a = p.parse_args(argv)
    a.argv = argv
    if a.nodes < 2 or a.minutes <= 0 or a.sample_every_s <= 0:
        p.error("--nodes must be >= 2, --minutes and --sample-every-s > 0")

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    temp = None
    try:
        if a.log_dir is None:
            temp = tempfile.mkdtemp(prefix="locoswarm-soak-")
            work = Path(temp)
        else:
            work = a.log_dir
            work.mkdir(parents=True, exist_ok=True)
        data = soak(a, work)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(_finite(data), indent=1) + "\n")
    png = a.png or a.json.with_suffix(".png")
    try:
        plot(data, png)
    except Exception as exc:  # a broken run may not have enough to plot
        if not data["error"]:
            raise
        print(f"no plot: {exc}", file=sys.stderr)
    _print_summary(data)
    if data["interrupted"]:
        return 130
    return 1 if data["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
