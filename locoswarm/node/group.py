"""DiLoCo groups of k > 2 nodes: a roster from the group's leader, then a reduce-scatter and an
all-gather built from pairwise ``Exchange`` calls on shards.

Member i owns shard i of the flat outer gradient. Reduce-scatter: every pair swaps the shards
the other owns, and each member averages its own shard over the group, in roster order. All-gather:
every pair swaps those averaged shards. Each member sends 2(k-1)/k of the payload and ends with
the same, bit-identical group mean. Knows tensors and peer ids; the bytes go through ``protocol``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from locoswarm.errors import PeerError, ProtocolViolation
from locoswarm.sync.diloco import group_mean
from locoswarm.sync.rounds import weighted_mean

PHASES = ("rs", "ag")


def shard_bounds(numel: int, k: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal shards of ``numel`` elements for ``k`` members."""
    base, extra = divmod(numel, k)
    bounds, start = [], 0
    for i in range(k):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def member_entry(peer_id: str, address: str | None) -> str:
    return f"{peer_id}@{address or ''}"


def parse_roster(entries: Sequence[str], peer: str | None) -> list[tuple[str, str | None]]:
    """Roster entries from a peer's header: ``[(peer_id, address or None), ...]``."""
    out = []
    for entry in entries:
        peer_id, sep, address = entry.partition("@")
        if not sep or not peer_id:
            raise ProtocolViolation(peer, f"roster entry {entry[:80]!r}", reason="malformed")
        out.append((peer_id, address or None))
    if len({p for p, _ in out}) != len(out) or len(out) < 2:
        raise ProtocolViolation(peer, "roster with repeated or too few members", reason="malformed")
    return out


@dataclass
class GroupRound:
    """One node's view of its group in one round, shared by the daemon and the handler."""

    roster: asyncio.Future[tuple[str, ...]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    vector: asyncio.Future[Tensor] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    """Our flat outer gradient, once the roster is known (the shards others ask us for)."""
    reduced: asyncio.Future[Tensor] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    """Our averaged shard, once the reduce-scatter is done (what all-gather asks for)."""
    inbound: dict[tuple[str, str], asyncio.Future[Tensor]] = field(default_factory=dict)

    def received(self, phase: str, peer: str) -> asyncio.Future[Tensor]:
        key = (phase, peer)
        if key not in self.inbound:
            self.inbound[key] = asyncio.get_running_loop().create_future()
        return self.inbound[key]

    def members(self) -> list[tuple[str, str | None]]:
        return parse_roster(self.roster.result(), None)

    def members_ids(self) -> list[str]:
        return [p for p, _ in self.members()]

    def index(self, peer: str) -> int:
        ids = [p for p, _ in self.members()]
        if peer not in ids:
            raise ProtocolViolation(
                peer, "not a member of our group this round", reason="malformed"
            )
        return ids.index(peer)

    def close(self) -> None:
        futures: list[asyncio.Future[Any]] = [
            self.roster,
            self.vector,
            self.reduced,
            *self.inbound.values(),
        ]
        for future in futures:
            if not future.done():
                future.cancel()


def dials(members: list[tuple[str, str | None]], me: int, other: int) -> bool:
    """Who opens the call between two members: the one without a gRPC address when the other
    has one (direct gRPC); else the lower index (gRPC, or libp2p when neither has one)."""
    my_address, other_address = members[me][1], members[other][1]
    if (my_address is None) != (other_address is None):
        return my_address is None
    return me < other


SwapShard = Callable[[str, str, Tensor], Awaitable[Tensor]]
"""``swap(phase, peer_id, our_shard) -> their shard`` (a dialled Exchange)."""


async def group_average(
    group: GroupRound,
    me_id: str,
    vector: Tensor,
    swap: SwapShard,
    *,
    timeout_s: float,
    shares: Callable[[list[str]], list[float] | None] | None = None,
) -> Tensor:
    """The group mean of every member's ``vector``; raises ``PeerError`` when a swap failed.
    ``shares(ids)``: each member's share of the mean once the reduce-scatter brought every
    member's shard (weighted by the tokens each trained), None for equal shares."""
    members = group.members()
    ids = [p for p, _ in members]
    me = ids.index(me_id)
    bounds = shard_bounds(vector.numel(), len(ids))
    group.vector.set_result(vector)

    async def pairwise(phase: str, ours: Callable[[int], Tensor]) -> dict[int, Tensor]:
        async def one(j: int) -> Tensor:
            if dials(members, me, j):
                return await swap(phase, ids[j], ours(j))
            return await group.received(phase, ids[j])

        others = [j for j in range(len(ids)) if j != me]
        async with asyncio.timeout(timeout_s):
            results = await asyncio.gather(*(one(j) for j in others), return_exceptions=True)
        failed = [
            (ids[j], r)
            for j, r in zip(others, results, strict=True)
            if isinstance(r, BaseException)
        ]
        if failed:
            peer, why = failed[0]
            raise PeerError(peer, f"group {phase} with {len(failed)} member(s) failed: {why}")
        return {j: r for j, r in zip(others, results, strict=True) if isinstance(r, Tensor)}

    lo, hi = bounds[me]
    gathered = await pairwise("rs", lambda j: vector[bounds[j][0] : bounds[j][1]])
    parts = [vector[lo:hi] if j == me else gathered[j] for j in range(len(ids))]
    weights = None if shares is None else shares(ids)
    mine = group_mean(parts) if weights is None else weighted_mean(parts, weights)
    group.reduced.set_result(mine)
    shards = await pairwise("ag", lambda _j: mine)
    return torch.cat([mine if j == me else shards[j] for j in range(len(ids))])
