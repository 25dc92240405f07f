"""Peers benchmark: N nodes on 127.0.0.1 find each other in the hivemind DHT, then pair up.

Usage: python -m bench.peers [--nodes 4 8 16 32] [--rounds 5] [--deadline-s 5.0]
       --json out/peers.json [--png out/peers.png]

Each size given to ``--nodes`` is a fresh swarm, run one after the other (the previous one is shut
down first), so one run shows how the per-node DHT cost grows with the swarm. Every node is made of
the project's real parts, all in one process and one uvloop event loop (the DHTs run in their own
forked processes, each with its ``p2pd``):

- a ``Membership`` (hivemind DHT on ``/ip4/127.0.0.1/tcp/0``): the first node starts a new swarm,
  the others join through the first node's visible multiaddrs, one after the other;
- a ``PeerServer`` on ``127.0.0.1:0`` whose handler answers an Exchange only if the node's
  ``Matchmaker.on_proposal`` accepts it (otherwise it refuses as ``busy``), and a ``PeerClient``;
- a ``Matchmaker`` whose ``propose`` is one real ``PeerClient.exchange`` of a small payload
  (``PAYLOAD_BYTES``) to the peer's address from its DHT record.

All DHTs are started before any gRPC object exists (the DHT forks).

Measured, per size:

- ``join_s``: from starting the first DHT to all N Memberships started (``join_per_node_s``: when
  each one was up, from the same start);
- ``discover_s``: from all N records announced (``announce`` returned on every node) until every
  node's ``list_peers()`` holds all N records, polled every ``POLL_S``;
- per round (outer step 0..R-1): every node re-announces its record at the new step and reads its
  view with ``list_peers()`` (the round's DHT phase: ``records_read`` is each view's size, and
  ``dht_bytes`` what each node's ``p2pd`` sent and received over TCP meanwhile), then all N
  ``match`` calls start at once; ``pair_s`` runs from that start until all N have returned. A
  dialler returns once its exchange is complete, a responder once it accepted a proposal. Each
  round counts pairs (diallers with an accepted session), responders and solo steps, and checks
  that nobody is double-booked: every dialler's partner is a responder naming it and vice versa,
  and no node takes part in more than one completed exchange (as dialler or, by its handler's
  record, as responder).

DHT bytes are the kernel's per-connection TCP counters (``bytes_sent``, ``bytes_received`` from
``ss -tinp``) of the sockets each node's ``p2pd`` holds, read before and after the phase: the
libp2p wire bytes (noise encryption and yamux framing included, TCP/IP headers not). The gRPC
exchanges run in this process, not in ``p2pd``, so they are not counted. A connection opened and
closed within the phase would be missed; libp2p keeps its connections open, so few are. Without
``ss`` the byte figures are None.

Writes JSON (header, one entry per size with its setup times, per-round results and medians, and
the growth of the per-node figures with N) and a PNG; prints a summary to stderr. Every DHT process
and ``p2pd`` is shut down at the end of each size, also on errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import version as _version
from locoswarm.errors import PeerError, PeerUnavailable
from locoswarm.node import processes as procs
from locoswarm.peers import Match, Matchmaker, PeerRecord, PeersConfig
from locoswarm.peers.membership import Membership
from locoswarm.protocol import (
    Header,
    LocalView,
    Outgoing,
    PeerClient,
    PeerServer,
    ProtocolConfig,
    Received,
    StatusInfo,
    TensorSpec,
)

HOST = "127.0.0.1"
DHT_MADDR = f"/ip4/{HOST}/tcp/0"
RUN_ID = "bench-peers"
FINGERPRINT = "fp-bench"
SYNC = "noloco"
VERSION = "bench"
PAYLOAD_BYTES = 4096
"""Bytes each side of a pair sends in its exchange."""
POLL_S = 0.1
"""How often discovery polls every node's ``list_peers()``."""
DISCOVER_TIMEOUT_S = 60.0
BOOTSTRAP_TIMEOUT_S = 15.0
SHUTDOWN_GRACE_S = 1.0
DEFAULT_NODES = (8,)
DEFAULT_ROUNDS = 5
DEFAULT_DEADLINE_S = 5.0


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# -- DHT traffic: the kernel's TCP counters of each p2pd's connections -------------------------

_SS_PID = re.compile(r"pid=(\d+)")
_SS_SENT = re.compile(r"\bbytes_sent:(\d+)")
_SS_RECEIVED = re.compile(r"\bbytes_received:(\d+)")
SS_TIMEOUT_S = 10.0

Sockets = dict[tuple[str, str], tuple[int, int, int]]
"""(local address, peer address) -> (pid, bytes sent, bytes received) of one TCP connection."""


def parse_ss(text: str, pids: set[int]) -> Sockets:
    """The connections of processes ``pids`` in ``ss -tinpH`` output (a socket's line, then its
    indented line of TCP info)."""
    found: Sockets = {}
    key: tuple[str, str] | None = None
    pid = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            fields = line.split()
            owner = _SS_PID.search(line)
            key, pid = None, 0
            if owner and int(owner[1]) in pids and len(fields) >= 4:
                key, pid = (fields[2], fields[3]), int(owner[1])
            continue
        if key is not None:
            sent, received = _SS_SENT.search(line), _SS_RECEIVED.search(line)
            found[key] = (pid, int(sent[1]) if sent else 0, int(received[1]) if received else 0)
            key = None
    return found


async def tcp_sockets(pids: set[int]) -> Sockets | None:
    """The TCP connections ``pids`` hold now, or None where ``ss`` is missing."""
    if shutil.which("ss") is None:
        return None
    done = await asyncio.to_thread(
        subprocess.run,
        ["ss", "-tinpH", "state", "established"],
        capture_output=True,
        text=True,
        timeout=SS_TIMEOUT_S,
        check=False,
    )
    return parse_ss(done.stdout, pids) if done.returncode == 0 else None


def traffic(before: Sockets | None, after: Sockets | None) -> dict[int, dict[str, int]] | None:
    """Bytes each pid sent and received between two readings (a connection new since ``before``
    counts whole; one closed in between is lost)."""
    if before is None or after is None:
        return None
    out: dict[int, dict[str, int]] = {}
    for key, (pid, sent, received) in after.items():
        _pid, sent0, received0 = before.get(key, (pid, 0, 0))
        counts = out.setdefault(pid, {"sent": 0, "received": 0})
        counts["sent"] += max(0, sent - sent0)
        counts["received"] += max(0, received - received0)
    return out


def make_header(sender: str, outer_step: int) -> Header:
    spec = TensorSpec(
        name="w",
        codec="fp32",
        dtype="float32",
        shape=(PAYLOAD_BYTES // 4,),
        num_bytes=PAYLOAD_BYTES,
    )
    return Header(
        run_id=RUN_ID,
        outer_step=outer_step,
        strategy=SYNC,
        sender_id=sender,
        model_fingerprint=FINGERPRINT,
        tensors=(spec,),
        kind="outer_grad",
    )


class BenchHandler:
    """A node's ``ExchangeHandler``: admits a proposal only if its matchmaker accepts it."""

    def __init__(self, peer_id: str, matchmaker: Matchmaker[Received], wait_s: float) -> None:
        self.peer_id = peer_id
        self.matchmaker = matchmaker
        self.wait_s = wait_s
        self.step = 0
        self.payload = peer_id.encode().ljust(PAYLOAD_BYTES, b".")[:PAYLOAD_BYTES]
        self.exchanges: list[tuple[int, str]] = []
        """(outer step, dialler) of every completed exchange we answered."""
        self.abandoned: list[tuple[int, str, str]] = []
        self.refused: list[tuple[int, str, str]] = []
        """(outer step, proposer, matchmaker's reason) of every proposal we refused."""
        self.rejects: Counter[str] = Counter()
        self.bytes = {"sent": 0, "received": 0}

    def local_view(self) -> LocalView:
        return LocalView(run_id=RUN_ID, model_fingerprint=FINGERPRINT, outer_step=self.step)

    async def admit(self, peer: str, header: Header) -> Outgoing:
        accepted, why = await self.matchmaker.on_proposal(
            peer, header.outer_step, wait_s=self.wait_s
        )
        if not accepted:
            self.refused.append((header.outer_step, peer, why))
            raise PeerUnavailable(peer, why, reason="busy")
        return Outgoing(make_header(self.peer_id, header.outer_step), self.payload)

    async def on_exchange(self, peer: str, received: Received) -> None:
        self.exchanges.append((received.header.outer_step, peer))

    def on_abandoned(self, peer: str, header: Header, reason: str) -> None:
        self.abandoned.append((header.outer_step, peer, reason))

    async def on_fetch_state(self, peer: str) -> Outgoing:
        raise PeerUnavailable(peer, "no state in the peers benchmark", reason="busy")

    def status(self) -> StatusInfo:
        return StatusInfo(
            peer_id=self.peer_id,
            run_id=RUN_ID,
            outer_step=self.step,
            strategy=SYNC,
            version=VERSION,
            num_peers=0,
            bytes_sent=self.bytes["sent"],
            bytes_received=self.bytes["received"],
            model_fingerprint=FINGERPRINT,
        )

    def on_transfer(self, direction: str, num_bytes: int) -> None:
        self.bytes[direction] += num_bytes

    def on_reject(self, reason: str) -> None:
        self.rejects[reason] += 1


@dataclass
class Node:
    index: int
    peer_id: str
    membership: Membership
    matchmaker: Matchmaker[Received]
    handler: BenchHandler
    address: str = ""
    client: PeerClient | None = None
    p2pd: int = 0
    """Pid of its DHT's p2pd (0: not found), whose TCP connections carry its DHT traffic."""
    dial_errors: list[tuple[int, str, str]] = field(default_factory=list)
    """(outer step, peer, error) of every proposal of ours that failed."""

    def record(self, outer_step: int) -> PeerRecord:
        return PeerRecord(
            peer_id=self.peer_id,
            address=self.address,
            outer_step=outer_step,
            model_fingerprint=FINGERPRINT,
            sync=SYNC,
            version=VERSION,
        )

    async def match(
        self, step: int, view: list[PeerRecord], deadline_s: float
    ) -> tuple[Match[Received], float]:
        """One round's ``Matchmaker.match``; returns the match and when it returned."""
        by_id = {r.peer_id: r for r in view}
        client = self.client
        assert client is not None
        outgoing = Outgoing(make_header(self.peer_id, step), self.handler.payload)
        local = LocalView(run_id=RUN_ID, model_fingerprint=FINGERPRINT, outer_step=step)

        async def propose(peer: str, outer_step: int) -> Received | None:
            record = by_id.get(peer)
            if record is None or record.address is None:
                self.dial_errors.append((outer_step, peer, "no address in our view"))
                return None
            try:
                return await client.exchange(
                    record.address, outgoing, view=local, timeout_s=deadline_s
                )
            except PeerError as exc:
                self.dial_errors.append((outer_step, peer, f"{exc.reason}: {exc.message}"))
                return None

        self.handler.step = step
        found = await self.matchmaker.match(self.record(step), view, propose, deadline_s=deadline_s)
        return found, time.perf_counter()


def check_round(nodes: list[Node], step: int, matches: dict[str, Match[Received]]) -> list[str]:
    """Problems with one round's outcome (empty when nobody is double-booked)."""
    problems: list[str] = []
    for pid, m in matches.items():
        if m.role == "dialler":
            for partner in m.partners:
                other = matches.get(partner)
                if other is None or other.role != "responder" or other.partners != (pid,):
                    got = "nothing" if other is None else f"{other.role} {list(other.partners)}"
                    problems.append(f"dialler {pid} paired with {partner}, whose match is {got}")
        elif m.role == "responder":
            other = matches.get(m.partners[0]) if len(m.partners) == 1 else None
            if other is None or other.role != "dialler" or pid not in other.partners:
                got = "nothing" if other is None else f"{other.role} {list(other.partners)}"
                problems.append(f"responder {pid} names {list(m.partners)}, whose match is {got}")
    # Completed exchanges per node: its own as dialler, plus those its handler answered.
    busy: Counter[str] = Counter()
    for pid, m in matches.items():
        if m.role == "dialler":
            busy[pid] += len(m.sessions)
    for node in nodes:
        answered = [peer for s, peer in node.handler.exchanges if s == step]
        busy[node.peer_id] += len(answered)
        m = matches[node.peer_id]
        if m.role == "responder" and answered != list(m.partners):
            problems.append(f"responder {node.peer_id} completed exchanges with {answered}")
    problems += [f"{pid} took part in {n} exchanges" for pid, n in sorted(busy.items()) if n > 1]
    return problems


def per_node_bytes(
    nodes: list[Node], counts: dict[int, dict[str, int]] | None
) -> dict[str, dict[str, int]] | None:
    if counts is None:
        return None
    return {n.peer_id: counts.get(n.p2pd, {"sent": 0, "received": 0}) for n in nodes}


async def run_round(nodes: list[Node], step: int, deadline_s: float) -> dict[str, Any]:
    p2pds = {n.p2pd for n in nodes}
    before = await tcp_sockets(p2pds)
    t_announce = time.perf_counter()
    await asyncio.gather(*(n.membership.announce(n.record(step)) for n in nodes))
    views = await asyncio.gather(*(n.membership.list_peers() for n in nodes))
    announce_s = time.perf_counter() - t_announce
    after_dht = await tcp_sockets(p2pds)

    start = time.perf_counter()
    async with asyncio.timeout(3 * deadline_s + 30.0):
        done = await asyncio.gather(
            *(n.match(step, view, deadline_s) for n, view in zip(nodes, views, strict=True))
        )
    pair_s = time.perf_counter() - start
    background = traffic(after_dht, await tcp_sockets(p2pds))

    matches = {n.peer_id: m for n, (m, _t) in zip(nodes, done, strict=True)}
    problems = check_round(nodes, step, matches)
    roles = Counter(m.role for m in matches.values())
    return {
        "outer_step": step,
        "pair_s": pair_s,
        "per_node_s": {n.peer_id: t - start for n, (_m, t) in zip(nodes, done, strict=True)},
        "announce_and_view_s": announce_s,
        "view_sizes": {n.peer_id: len(v) for n, v in zip(nodes, views, strict=True)},
        "records_read": sum(len(v) for v in views),
        "dht_bytes": per_node_bytes(nodes, traffic(before, after_dht)),
        "background_dht_bytes": None
        if background is None
        else sum(c["sent"] for c in background.values()),
        "pairs": roles["dialler"],
        "responders": roles["responder"],
        "solos": roles["solo"],
        "matches": {
            pid: {"role": m.role, "partners": list(m.partners), "reason": m.reason}
            for pid, m in matches.items()
        },
        "dial_failures": [
            {"from": n.peer_id, "to": peer, "error": err}
            for n in nodes
            for s, peer, err in n.dial_errors
            if s == step
        ],
        "refused": [
            {"by": n.peer_id, "proposer": peer, "reason": why}
            for n in nodes
            for s, peer, why in n.handler.refused
            if s == step
        ],
        "abandoned": [
            {"by": n.peer_id, "dialler": peer, "reason": why}
            for n in nodes
            for s, peer, why in n.handler.abandoned
            if s == step
        ],
        "no_double_booking": not problems,
        "problems": problems,
    }


async def discover(nodes: list[Node]) -> dict[str, Any]:
    """Announce every record, then poll every view until each holds all of them."""
    t_announce = time.perf_counter()
    stored = await asyncio.gather(*(n.membership.announce(n.record(0)) for n in nodes))
    start = time.perf_counter()
    wanted = {n.peer_id for n in nodes}
    seen_at: dict[str, float] = {}
    polls = 0
    async with asyncio.timeout(DISCOVER_TIMEOUT_S):
        while len(seen_at) < len(nodes):
            polls += 1
            waiting = [n for n in nodes if n.peer_id not in seen_at]
            views = await asyncio.gather(*(n.membership.list_peers() for n in waiting))
            now = time.perf_counter()
            for node, view in zip(waiting, views, strict=True):
                if wanted <= {r.peer_id for r in view}:
                    seen_at[node.peer_id] = now - start
            if len(seen_at) < len(nodes):
                await asyncio.sleep(POLL_S)
    return {
        "announce_s": start - t_announce,
        "announced_ok": all(stored),
        "discover_s": max(seen_at.values()),
        "discover_per_node_s": {n.peer_id: seen_at[n.peer_id] for n in nodes},
        "discover_polls": polls,
    }


def peers_config(initial: tuple[str, ...]) -> PeersConfig:
    return PeersConfig(
        run_id=RUN_ID,
        initial_peers=initial,
        host_maddrs=(DHT_MADDR,),
        bootstrap_timeout_s=BOOTSTRAP_TIMEOUT_S,
    )


async def run(num_nodes: int, rounds: int, deadline_s: float, out: dict[str, Any]) -> None:
    """The whole benchmark; fills ``out`` as it goes (so a failure keeps what was measured)."""
    wait_s = deadline_s
    async with contextlib.AsyncExitStack() as stack:
        # 1. Every DHT first: hivemind forks its process, which must happen before gRPC exists.
        memberships: list[Membership] = []
        join_at: list[float] = []
        start = time.perf_counter()
        first = await stack.enter_async_context(Membership.start(peers_config(())))
        memberships.append(first)
        join_at.append(time.perf_counter() - start)
        bootstrap = tuple(first.visible_maddrs())
        out["bootstrap_maddrs"] = list(bootstrap)
        for _ in range(num_nodes - 1):
            member = await stack.enter_async_context(Membership.start(peers_config(bootstrap)))
            memberships.append(member)
            join_at.append(time.perf_counter() - start)
        out["join_s"] = join_at[-1]
        out["join_per_node_s"] = join_at
        out["dht_pids"] = [m.dht.pid for m in memberships]
        p2pds = [sorted(procs.named("p2pd", below=m.dht.pid)) for m in memberships]
        out["p2pd_pids"] = [found[0] if found else 0 for found in p2pds]
        print(f"  {num_nodes} DHTs up in {out['join_s']:.2f}s", file=sys.stderr, flush=True)

        # 2. Then the gRPC servers and clients.
        protocol = ProtocolConfig(host=HOST, port=0, shutdown_grace_s=SHUTDOWN_GRACE_S)
        nodes: list[Node] = []
        for i, membership in enumerate(memberships):
            peer_id = membership.dht_peer_id  # a record names its signer's peer id
            matchmaker: Matchmaker[Received] = Matchmaker(membership.config, peer_id)
            handler = BenchHandler(peer_id, matchmaker, wait_s)
            node = Node(i, peer_id, membership, matchmaker, handler, p2pd=out["p2pd_pids"][i])
            server = await stack.enter_async_context(PeerServer.start(protocol, handler))
            node.address = f"{HOST}:{server.port}"
            node.client = PeerClient(protocol, peer_id=peer_id, on_transfer=handler.on_transfer)
            stack.push_async_callback(node.client.close)
            nodes.append(node)

        out["peer_ids"] = [n.peer_id for n in nodes]
        # 3. Discovery.
        out.update(await discover(nodes))
        print(f"  all records seen in {out['discover_s']:.2f}s", file=sys.stderr, flush=True)

        # 4. Matchmaking rounds.
        for step in range(rounds):
            result = await run_round(nodes, step, deadline_s)
            out["rounds"].append(result)
            print(
                f"  round {step}: {result['pair_s']:.3f}s, {result['pairs']} pairs, "
                f"{result['solos']} solo, {result['records_read']} records read, "
                f"{_fmt(_mean_traffic(result), '.0f')} DHT bytes per node, double-booking "
                f"{'none' if result['no_double_booking'] else result['problems']}",
                file=sys.stderr,
                flush=True,
            )
        out["rejects"] = {n.peer_id: dict(n.handler.rejects) for n in nodes}
        out["dht_dropped"] = {n.peer_id: dict(n.membership.dropped) for n in nodes}
        cleanup = time.perf_counter()
    out["cleanup_s"] = time.perf_counter() - cleanup


def _node_traffic(result: dict[str, Any]) -> list[int] | None:
    """Each node's DHT bytes (sent plus received) in one round's DHT phase."""
    counts = result.get("dht_bytes")
    if counts is None:
        return None
    return [c["sent"] + c["received"] for c in counts.values()]


def _mean_traffic(result: dict[str, Any]) -> float | None:
    per_node = _node_traffic(result)
    return statistics.fmean(per_node) if per_node else None


def summarise(out: dict[str, Any]) -> dict[str, Any]:
    """One size's medians over its rounds."""
    rounds = out["rounds"]
    pair = [r["pair_s"] for r in rounds]
    nodes = out["nodes"]
    traffic_per_round = [t for r in rounds if (t := _node_traffic(r))]
    received = [
        statistics.fmean(c["received"] for c in r["dht_bytes"].values())
        for r in rounds
        if r.get("dht_bytes")
    ]
    read = [r["records_read"] / nodes for r in rounds]
    return {
        "pair_s": {"median": _median(pair), "all": pair},
        "pairs": {
            "median": _median([r["pairs"] for r in rounds]),
            "all": [r["pairs"] for r in rounds],
        },
        "solos": {
            "median": _median([r["solos"] for r in rounds]),
            "all": [r["solos"] for r in rounds],
        },
        "no_double_booking": bool(rounds) and all(r["no_double_booking"] for r in rounds),
        "records_read_per_node_round": _median(read),
        "records_read_per_round": _median([r["records_read"] for r in rounds]),
        "dht_bytes_per_node_round": {
            "mean": _median([statistics.fmean(t) for t in traffic_per_round]),
            "median": _median([statistics.median(t) for t in traffic_per_round]),
            "max": _median([max(t) for t in traffic_per_round]),
            "all_means": [statistics.fmean(t) for t in traffic_per_round],
        },
        "dht_bytes_received_per_record_read": _median(
            [got / per_node for got, per_node in zip(received, read, strict=False) if per_node]
        ),
    }


def fit_growth(sizes: list[int], values: list[float | None]) -> dict[str, Any]:
    """``value ~ c * N^exponent`` (least squares on logs) and ``value ~ a + b * N`` over the sizes
    that have a positive value."""
    points = [(n, v) for n, v in zip(sizes, values, strict=True) if v is not None and v > 0]
    fit: dict[str, Any] = {"nodes": [n for n, _ in points], "values": [v for _, v in points]}
    if len({n for n, _ in points}) < 2:
        return fit | {"exponent": None, "per_extra_node": None, "intercept": None}
    xs = [float(n) for n, _ in points]
    ys = [v for _, v in points]
    slope, intercept = statistics.linear_regression(xs, ys)
    log_slope, _ = statistics.linear_regression(
        [math.log(x) for x in xs], [math.log(y) for y in ys]
    )
    return fit | {"exponent": log_slope, "per_extra_node": slope, "intercept": intercept}


def growth(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """How the per-node figures grow with the swarm size N, over the sizes measured."""
    sizes = [r["nodes"] for r in runs]
    bytes_per_node = [r.get("dht_bytes_per_node_round") or {} for r in runs]
    return {
        "records_read_per_node_round": fit_growth(
            sizes, [r.get("records_read_per_node_round") for r in runs]
        ),
        "records_read_per_round": fit_growth(
            sizes, [r.get("records_read_per_round") for r in runs]
        ),
        "dht_bytes_per_node_round_mean": fit_growth(sizes, [b.get("mean") for b in bytes_per_node]),
        "dht_bytes_per_node_round_max": fit_growth(sizes, [b.get("max") for b in bytes_per_node]),
        "join_s": fit_growth(sizes, [r.get("join_s") for r in runs]),
        "discover_s": fit_growth(sizes, [r.get("discover_s") for r in runs]),
    }


def plot(out: dict[str, Any], path: Path) -> None:
    """Setup times, records read, DHT bytes per node and round, and pairing time, against N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    header = out["header"]
    runs = [r for r in out.get("runs") or [] if r.get("rounds")]
    sizes = [r["nodes"] for r in runs]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    (setup, records), (volume, pairing) = axes

    setup.plot(sizes, [r.get("join_s") for r in runs], "o-", label="join: all DHTs up")
    setup.plot(sizes, [r.get("discover_s") for r in runs], "s-", label="discover: all records seen")
    setup.set(xlabel="nodes N", ylabel="seconds", title="join (one after the other) and discovery")

    fits = out.get("growth") or {}
    per_node = [r.get("records_read_per_node_round") for r in runs]
    per_round = [r.get("records_read_per_round") for r in runs]
    records.loglog(sizes, per_node, "o-", base=2, label="per node and round")
    records.loglog(sizes, per_round, "s-", base=2, label="whole swarm per round")
    records.set(xlabel="nodes N", ylabel="records read", title="records read (list_peers views)")

    lines = {"mean": "o-", "median": "^-", "max": "s--"}
    for stat, style in lines.items():
        values = [(r.get("dht_bytes_per_node_round") or {}).get(stat) for r in runs]
        if any(v is not None for v in values):
            volume.loglog(sizes, values, style, base=2, label=f"{stat} over nodes")
    for key, ax in (("dht_bytes_per_node_round_mean", volume),):
        exponent = (fits.get(key) or {}).get("exponent")
        if exponent is not None:
            ax.set_title(f"DHT bytes per node and round (announce + read): mean ~ N^{exponent:.2f}")
        else:
            ax.set_title("DHT bytes per node and round (announce + read)")
    volume.set(xlabel="nodes N", ylabel="bytes (p2pd TCP, sent + received)")

    medians = [(r.get("pair_s") or {}).get("median") for r in runs]
    colors = ["tab:green" if r.get("no_double_booking") else "tab:red" for r in runs]
    xs = range(len(runs))
    pairing.bar(list(xs), [m or 0.0 for m in medians], color=colors)
    for x, r, med in zip(xs, runs, medians, strict=True):
        pairs = (r.get("pairs") or {}).get("all")
        solos = (r.get("solos") or {}).get("all")
        pairing.text(x, med or 0.0, f"pairs {pairs}\nsolo {solos}", ha="center", fontsize=7)
    pairing.set_xticks(list(xs), [f"N={n}" for n in sizes])
    pairing.set(
        ylabel="median s until all match() returned",
        title=f"pairing (deadline {header['deadline_s']} s; green: no double booking)",
    )
    for ax in (setup, records, volume, pairing):
        ax.grid(alpha=0.3)
        if ax is not pairing:
            ax.legend(fontsize=8)
    fig.suptitle(
        f"locoswarm peers on {HOST}: hivemind DHT membership + Matchmaker over gRPC Exchange, "
        f"{header['rounds']} rounds per size ({header['cpu_count']} CPUs)",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark. Returns the exit status."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument(
        "--nodes",
        type=int,
        nargs="+",
        default=list(DEFAULT_NODES),
        help="swarm sizes (each >= 2), each a fresh swarm, run one after the other",
    )
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="matchmaking rounds")
    p.add_argument(
        "--deadline-s", type=float, default=DEFAULT_DEADLINE_S, help="match() deadline per round"
    )
    p.add_argument("--json", required=True, help="where to write the JSON results")
    p.add_argument("--png", default=None, help="plot path (default: the JSON path with .png)")
    a = p.parse_args(argv)
    sizes: list[int] = a.nodes
    if min(sizes) < 2 or len(set(sizes)) != len(sizes):
        p.error("--nodes must be distinct sizes, each >= 2")
    if a.rounds < 1:
        p.error("--rounds must be >= 1")
    if a.deadline_s <= 0:
        p.error("--deadline-s must be > 0")

    import uvloop

    print(
        f"peers benchmark: {sizes} nodes, {a.rounds} rounds, deadline {a.deadline_s}s, "
        f"load {os.getloadavg()[0]:.2f}",
        file=sys.stderr,
        flush=True,
    )
    started = time.perf_counter()
    load_before = os.getloadavg()
    out: dict[str, Any] = {
        "header": {
            "sizes": sizes,
            "rounds": a.rounds,
            "deadline_s": a.deadline_s,
            "payload_bytes": PAYLOAD_BYTES,
            "poll_s": POLL_S,
            "host": HOST,
            "run_id": RUN_ID,
            "group_size": PeersConfig().group_size,
            "lag_window": PeersConfig().lag_window,
            "listen_share": PeersConfig().listen_share,
            "definitions": {
                "join_s": "from starting the first DHT to all nodes' Memberships started "
                "(the others join one after the other through the first one's multiaddrs)",
                "discover_s": "from every node's announce() returned to every node's "
                f"list_peers() holding all records (polled every {POLL_S} s)",
                "pair_s": "from all nodes starting Matchmaker.match() at once (each with its "
                "list_peers() view, records re-announced at the round's outer step first) to all "
                "of them returned; a dialler returns after its gRPC Exchange completed; round 0 "
                "also opens the gRPC channels",
                "records_read": "records in the views of one round's list_peers() calls, summed "
                "over the nodes (per node: the view's size)",
                "dht_bytes": "per node: bytes its p2pd sent and received over TCP (kernel "
                "counters of its connections, ss -tinp) from before the round's announce() to "
                "after every node's list_peers() returned",
                "background_dht_bytes": "bytes all p2pds sent while the nodes matched (no DHT "
                "call of ours in flight)",
            },
            "process_layout": "all nodes in one process and one uvloop loop; each hivemind DHT "
            "in its own forked process with its p2pd",
            "cpu_count": os.cpu_count(),
            "versions": {
                "python": platform.python_version(),
                "hivemind": _version("hivemind"),
                "grpcio": _version("grpcio"),
                "protobuf": _version("protobuf"),
                "uvloop": _version("uvloop"),
            },
            "machine": platform.machine(),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "loadavg_before": list(load_before),
        },
        "runs": [],
        "error": None,
    }
    status = 0
    for num_nodes in sizes:
        print(f" {num_nodes} nodes:", file=sys.stderr, flush=True)
        one: dict[str, Any] = {"nodes": num_nodes, "rounds": [], "error": None}
        out["runs"].append(one)
        try:
            uvloop.run(run(num_nodes, a.rounds, a.deadline_s, one))
        except Exception as exc:  # noqa: BLE001 - recorded in the JSON, reported as the exit status
            one["error"] = out["error"] = _describe(exc)
            traceback.print_exc()
            status = 1
        one.update(summarise(one))
        if status:
            break  # a larger swarm would fail the same way
    out["growth"] = growth(out["runs"])
    out["header"]["loadavg_after"] = list(os.getloadavg())
    out["wall_s"] = time.perf_counter() - started
    json_path = Path(a.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(out, indent=1, default=str))
    png = Path(a.png) if a.png else json_path.with_suffix(".png")
    plot(out, png)
    for one in out["runs"]:
        volume = one["dht_bytes_per_node_round"]
        print(
            f"N={one['nodes']}: join {_fmt(one.get('join_s'))}s, discover "
            f"{_fmt(one.get('discover_s'))}s, records read per node and round "
            f"{_fmt(one['records_read_per_node_round'], '.0f')}, DHT bytes per node and round "
            f"mean {_fmt(volume['mean'], '.0f')} max {_fmt(volume['max'], '.0f')}, pair median "
            f"{_fmt(one['pair_s']['median'], '.3f')}s, pairs {one['pairs']['all']}, solos "
            f"{one['solos']['all']}, no double-booking: {one['no_double_booking']}",
            file=sys.stderr,
        )
    fits = out["growth"]
    print(
        "growth with N: records read per node ~ N^"
        f"{_fmt(fits['records_read_per_node_round']['exponent'])}, DHT bytes per node mean ~ N^"
        f"{_fmt(fits['dht_bytes_per_node_round_mean']['exponent'])} (max ~ N^"
        f"{_fmt(fits['dht_bytes_per_node_round_max']['exponent'])})",
        file=sys.stderr,
    )
    print(f"wrote {json_path} and {png} in {out['wall_s']:.1f}s", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
