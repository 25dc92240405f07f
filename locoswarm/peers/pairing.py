"""Matchmaking decisions as pure functions that return a reason.

Each round a node shuffles the sorted ids of its live, compatible peers with a seed derived from
(run, outer step) and cuts the order into groups; where views agree, groups agree without a
message. The group's dialler (its lowest reachable id) proposes; the others accept at most one
proposal per round (``decide_proposal``). Knows nothing of gRPC or tensors.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from locoswarm.peers.records import PeerRecord

Role = Literal["dial", "listen", "solo"]


@dataclass(frozen=True, slots=True)
class Plan:
    """What a node intends to do this round, before any message is exchanged."""

    role: Role
    group: tuple[str, ...]
    """Its planned group (itself included), in shuffle order."""
    targets: tuple[str, ...]
    """Whom it proposes to first (the rest of its group when it dials)."""
    fallbacks: tuple[str, ...]
    """Peers it may dial, in order, if its planned group does not form."""
    reason: str


def compatible(me: PeerRecord, other: PeerRecord, lag_window: int) -> tuple[bool, str]:
    """Whether ``other`` may be our partner at all."""
    if other.model_fingerprint != me.model_fingerprint:
        return False, "different model fingerprint"
    if other.sync != me.sync:
        return False, f"sync mode {other.sync}, ours {me.sync}"
    if abs(other.outer_step - me.outer_step) > lag_window:
        return False, f"outer step {other.outer_step}, ours {me.outer_step}"
    return True, "ok"


def round_seed(run_id: str, outer_step: int) -> int:
    """A seed every node of the run derives alike for this outer step."""
    digest = hashlib.sha256(f"{run_id}\n{outer_step}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def shuffled(ids: Sequence[str], run_id: str, outer_step: int) -> list[str]:
    """The round's order: sorted ids shuffled with the round's seed."""
    order = sorted(set(ids))
    random.Random(round_seed(run_id, outer_step)).shuffle(order)
    return order


def cut_groups(order: Sequence[str], group_size: int) -> list[tuple[str, ...]]:
    """Consecutive groups of ``group_size``; a last group of one is left alone (a solo step)."""
    return [tuple(order[i : i + group_size]) for i in range(0, len(order), group_size)]


def hypercube_groups(
    ids: Sequence[str], run_id: str, outer_step: int, relabel: bool = False
) -> list[tuple[str, ...]]:
    """Pairs along one hypercube dimension per round (the Moshpit SGD idea, consensus.md §4).

    The sorted ids get ranks 0..n-1; in round r, rank i pairs with i XOR 2^(r mod d), with
    d = ceil(log2 n). With a fixed membership of 2^d nodes the swarm's average is exact after d
    rounds. Ranks whose partner does not exist (n is not a power of two, or churn) are paired at
    random among themselves with the round's shuffle; a last one left over is alone.

    With ``relabel`` the ranks are a seeded shuffle of the ids, drawn anew every d rounds (one
    sweep of the cube): each sweep still averages exactly, but a node's neighbour along a given
    dimension changes from sweep to sweep. Anything else that cycles with period d (error
    feedback's block rotation) then stops meeting the same neighbour every time.
    """
    order = sorted(set(ids))
    n = len(order)
    if n < 2:
        return [tuple(order)] if order else []
    d = max(1, (n - 1).bit_length())
    if relabel:
        order = shuffled(order, f"{run_id}/cube", outer_step // d)
    bit = 1 << (outer_step % d)
    groups: list[tuple[str, ...]] = []
    left: list[str] = []
    for i, peer in enumerate(order):
        j = i ^ bit
        if j < n:
            if i < j:
                groups.append((peer, order[j]))
        else:
            left.append(peer)
    return groups + cut_groups(shuffled(left, run_id, outer_step), 2)


def round_groups(
    ids: Sequence[str], run_id: str, outer_step: int, group_size: int, schedule: str = "random"
) -> list[tuple[str, ...]]:
    """Every group of the round, as each node that sees ``ids`` computes it."""
    if schedule in ("hypercube", "hypercube-shuffled") and group_size == 2:
        return hypercube_groups(ids, run_id, outer_step, relabel=schedule != "hypercube")
    return cut_groups(shuffled(ids, run_id, outer_step), group_size)


def can_dial(caller: PeerRecord, callee: PeerRecord) -> bool:
    """Anyone may dial a node with an address; a node without one over libp2p, when both speak
    it (relayed or hole-punched by the DHT's daemon)."""
    if callee.peer_id == caller.peer_id:
        return False
    return callee.address is not None or (caller.over_libp2p and callee.over_libp2p)


def dialler(group: Sequence[PeerRecord]) -> PeerRecord | None:
    """The group member that proposes: the lowest reachable id; where none has an address, the
    lowest id over libp2p (when every member speaks it); None when nobody can be dialled."""
    reachable = [r for r in group if r.address is not None]
    if not reachable:
        if all(r.over_libp2p for r in group):
            return min(group, key=lambda r: r.peer_id)
        return None
    lowest = min(reachable, key=lambda r: r.peer_id)
    if len(group) == 2 and group[0].client_mode != group[1].client_mode:
        # A client-mode member and a reachable one: the client dials (direct gRPC).
        return next(r for r in group if r.client_mode)
    return lowest


def plan_round(
    me: PeerRecord,
    view: Sequence[PeerRecord],
    *,
    run_id: str,
    group_size: int,
    lag_window: int,
    available: Callable[[str], bool] = lambda _peer: True,
    schedule: str = "random",
) -> Plan:
    """Decide this round's role from our view of the swarm (``view`` may include us)."""
    by_id = {me.peer_id: me}
    for record in view:
        if (
            record.peer_id != me.peer_id
            and compatible(me, record, lag_window)[0]
            and available(record.peer_id)
        ):
            by_id[record.peer_id] = record
    order = shuffled(list(by_id), run_id, me.outer_step)
    fallbacks = tuple(p for p in order if p != me.peer_id and can_dial(me, by_id[p]))
    if len(by_id) == 1:
        return Plan("solo", (me.peer_id,), (), (), "no live compatible peer")
    groups = round_groups(list(by_id), run_id, me.outer_step, group_size, schedule)
    group = next(g for g in groups if me.peer_id in g)
    if len(group) == 1:
        return Plan("solo", group, (), fallbacks, "odd one out this round")
    members = [by_id[p] for p in group]
    lead = dialler(members)
    if lead is None:
        return Plan("solo", group, (), fallbacks, "no member of the group can be dialled")
    if lead.peer_id == me.peer_id:
        targets = tuple(p for p in group if p != me.peer_id and can_dial(me, by_id[p]))
        return Plan("dial", group, targets, fallbacks, "lowest reachable id of the group")
    return Plan("listen", group, (), fallbacks, f"{lead.peer_id} dials this group")


@dataclass(frozen=True, slots=True)
class ResponderState:
    """What a node knows when a proposal arrives."""

    outer_step: int | None
    """The outer step it is matching for now, or None while it is not matching (training
    between two round boundaries)."""
    matched: bool
    """It already accepted a proposal or finished matching for that step."""
    dialling: bool
    """It has a proposal of its own in flight."""
    proposer_ok: bool = True
    """The proposer is not backing off or banned. (It need not be in our view: views
    disagree, and a free peer dialling us is how a round still pairs.)"""
    mutual_and_lower: bool = False
    """Our one proposal in flight is to this same proposer, whose id is lower than ours: two
    nodes dialled each other at once, and the lower id's proposal wins."""
    finished_step: int | None = None
    """The last outer step whose matching it finished (matched, or settled for a solo step),
    or None before its first round. Between rounds it tells a proposal that is early (for a
    step it has not reached: worth waiting for its boundary) from one that is late (for a
    step it is done with: no boundary of ours will serve it)."""


def decide_proposal(
    state: ResponderState, proposal_step: int, lag_window: int
) -> tuple[bool | None, str]:
    """Accept (True), refuse (False) or wait for our next round boundary (None), with the reason.

    Partners meet at their own round boundaries: a node that is still training when a proposal
    comes makes the proposer wait (boundedly) for its boundary. Their outer steps may differ by
    up to ``lag_window`` (nodes drift apart when training overlaps the network). Between rounds,
    a proposal for a step the node has already finished is refused at once, not held: holding
    it would only keep the proposer from its other candidates until its deadline.
    """
    if not state.proposer_ok:
        return False, "proposer is incompatible, backing off or banned"
    if state.outer_step is None:
        if state.finished_step is not None and proposal_step <= state.finished_step:
            return False, (
                f"outer step {proposal_step} is over here (our last was {state.finished_step})"
            )
        return None, "not at a round boundary yet"
    if abs(proposal_step - state.outer_step) > lag_window:
        return False, f"outer step {proposal_step} is too far from ours ({state.outer_step})"
    if state.matched:
        return False, "already in an exchange this outer step"
    if state.dialling and not state.mutual_and_lower:
        return False, "proposing to another peer"
    return True, "ok"
