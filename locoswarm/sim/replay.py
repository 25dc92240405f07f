"""Replay a real swarm's rounds in the simulator and check every node's outer weights.

Each node's log holds one ``round-event`` per round (its boundary, round label, outcome and
partners, and the digests of its theta snapshot and of its new phi) and, for a late joiner, the
digest of the state it fetched. ``replay`` rebuilds every node as the daemon builds it (same
initial weights, the data seed of its peer id, the daemon's inner loop), trains it, and drives
``sync/rounds.py`` with the logged schedule: the same partners, the same outcomes. It returns,
per node and round, the digests the simulator computed beside the logged ones.

Knows the log format of ``node/daemon.py`` and nothing of sockets.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from locoswarm.sim.swarm import Replica
from locoswarm.sync import rounds
from locoswarm.sync.robust import Clipper
from locoswarm.sync.round_config import RoundConfig
from locoswarm.sync.rounds import Message, OuterState
from locoswarm.tasks.inner import InnerConfig, set_flat, weights_digest
from locoswarm.tasks.task import TaskConfig, TaskFactory, node_data_seed

__all__ = ["EVENT_PREFIX", "NodeLog", "ReplayRow", "parse_log", "replay", "round_events"]

EVENT_PREFIX = "round-event "
"""A daemon logs one line per round: this, then the round's JSON record."""
_JOIN = re.compile(r"late join: fetched the outer weights of round (\d+) from (\S+) \(phi (\w+)\)")


@dataclass
class NodeLog:
    """What one node's log says about its rounds."""

    peer: str
    events: list[dict[str, object]]
    joined_from: tuple[int, str, str] | None = None
    """A late joiner's (round, source peer, phi digest)."""


def round_events(text: str) -> list[dict[str, Any]]:
    """The ``round-event`` records of a node's log, in order (what the replay, the tests and the
    benchmarks read instead of the human lines)."""
    events = []
    for line in text.splitlines():
        at = line.find(EVENT_PREFIX)
        if at < 0:
            continue
        try:
            events.append(json.loads(line[at + len(EVENT_PREFIX) :]))
        except ValueError:
            continue  # a line cut off by a kill
    return events


def parse_log(text: str) -> NodeLog:
    events = round_events(text)
    if not events:
        raise ValueError("the log holds no round-event lines")
    join = _JOIN.search(text)
    joined = (int(join.group(1)), join.group(2), join.group(3)) if join else None
    return NodeLog(str(events[0]["peer"]), events, joined)


@dataclass(frozen=True, slots=True)
class ReplayRow:
    peer: str
    round: int
    theta_logged: str
    theta_replayed: str
    phi_logged: str
    phi_replayed: str

    @property
    def matches(self) -> bool:
        return self.theta_logged == self.theta_replayed and self.phi_logged == self.phi_replayed


@dataclass
class _Node:
    log: NodeLog
    replica: Replica
    next: int = 0
    """Index of the next event to run."""
    snapshot: Tensor | None = None
    message: Message | None = None
    history: list[OuterState] = field(default_factory=list)
    started: bool = False
    messages: dict[int, Message] = field(default_factory=dict)
    """Every message this node prepared, by event index."""


def replay(
    logs: Iterable[NodeLog],
    *,
    rc: RoundConfig,
    task: TaskConfig,
    inner: InnerConfig,
    inner_steps: int,
    total_rounds: int | None,
    seed: int,
    overlap: bool,
) -> list[ReplayRow]:
    """Replays every node's rounds; raises ``ValueError`` when the logs cannot be replayed (a
    partner's round is missing, or a late joiner's state is never reached)."""
    nodes: dict[str, _Node] = {}
    total = total_rounds * inner_steps if total_rounds else None
    for log in logs:
        torch.manual_seed(seed)  # every node's initial weights (the daemon seeds before build)
        built = TaskFactory(task).build(replica=0, num_replicas=1, seed=node_data_seed(log.peer))
        replica = Replica(log.peer, built, inner, total)
        replica.clipper = Clipper(rc)
        nodes[log.peer] = _Node(log, replica, history=[replica.state])
    rows: list[ReplayRow] = []
    progress = True
    while progress:
        progress = False
        for node in nodes.values():
            if node.next >= len(node.log.events):
                continue
            if not node.started and not _start(node, nodes):
                continue
            event = node.log.events[node.next]
            if node.message is None:
                after = event.get("applied_after")
                delay = inner_steps if after is None else int(after)  # type: ignore[call-overload]
                node.snapshot = node.replica.phase(inner_steps, overlap=overlap, delay=delay)
                label = int(event["round"])  # type: ignore[call-overload]
                node.message = rounds.prepare(rc, node.replica.state, node.snapshot, round=label)
                node.messages[node.next] = node.message
                if rc.mode != "noloco":  # what the daemon serves a late joiner mid-round
                    node.history.append(rounds.alone(rc, node.replica.state, node.message))
                progress = True
            partners = [str(p) for p in event["partners"]]  # type: ignore[attr-defined]
            labels = [int(x) for x in event.get("partner_rounds", [event["round"]] * len(partners))]  # type: ignore[attr-defined]
            theirs = [_message_for(nodes, p, lb) for p, lb in zip(partners, labels, strict=True)]
            if any(m is None for m in theirs):
                continue
            tokens = event.get("tokens") or {}
            weights = {str(p): int(t) for p, t in tokens.items()}  # type: ignore[attr-defined]
            new = _finish(rc, node, [m for m in theirs if m is not None], partners, weights)
            node.replica.finish(new, node.snapshot, overlap=overlap)  # type: ignore[arg-type]
            node.history.append(new)
            assert node.snapshot is not None
            rows.append(
                ReplayRow(
                    node.log.peer,
                    int(event["round"]),  # type: ignore[call-overload]
                    str(event["theta"]),
                    weights_digest(node.snapshot),
                    str(event["phi"]),
                    weights_digest(new.phi),
                )
            )
            node.next += 1
            node.message = None
            progress = True
    stuck = [n.log.peer for n in nodes.values() if n.next < len(n.log.events)]
    if stuck:
        raise ValueError(f"could not replay the rounds of {stuck}: a partner's round is missing")
    return rows


def _start(node: _Node, nodes: dict[str, _Node]) -> bool:
    """A late joiner starts from the state it fetched, once its source has reached it."""
    if node.log.joined_from is None:
        node.started = True
        return True
    _, source, phi = node.log.joined_from
    found = next((s for s in nodes[source].history if weights_digest(s.phi) == phi), None)
    if found is None:
        return False
    momentum = found.momentum if found.momentum is not None and bool(found.momentum.any()) else None
    node.replica.state = OuterState(phi=found.phi.clone(), momentum=momentum)
    set_flat(node.replica.model, found.phi)
    node.history = [node.replica.state]
    node.started = True
    return True


def _message_for(nodes: dict[str, _Node], peer: str, label: int) -> Message | None:
    """``peer``'s message of its round ``label`` (None until it is prepared)."""
    node = nodes.get(peer)
    if node is None:
        raise ValueError(f"a node exchanged with {peer}, whose log is missing")
    index = [j for j, e in enumerate(node.log.events) if int(e["round"]) == label]  # type: ignore[call-overload]
    if not index:
        raise ValueError(f"{peer} logged no round {label}")
    return node.messages.get(index[0])


def _finish(
    rc: RoundConfig,
    node: _Node,
    theirs: list[Message],
    partners: list[str],
    tokens: dict[str, int],
) -> OuterState:
    """The node's new state, as its daemon computed it: the members' mean in id order,
    weighted by the tokens each said it trained (``tokens``; absent in older logs: equal)."""
    msg = node.message
    assert msg is not None
    if not theirs:
        return rounds.alone(rc, node.replica.state, msg)
    by_id = {node.log.peer: msg.own}
    for peer, other in zip(partners, theirs, strict=True):
        by_id[peer] = rounds.read(rc, msg, other.parts).tensors
        if len(theirs) == 1 and node.replica.clipper is not None:  # pairs, as the daemon
            by_id[peer], _ = node.replica.clipper.clip(msg.own, by_id[peer], node.replica.state.phi)
    ids = sorted(by_id)
    shares = rounds.member_shares([tokens.get(p, 0) for p in ids], rc.max_weight_ratio)
    members = [by_id[p] for p in ids]
    mean = rounds.member_mean(members, shares)
    spread = rounds.spread_of(shares, ids.index(node.log.peer))
    return rounds.combine(rc, node.replica.state, msg, mean, spread=spread)
