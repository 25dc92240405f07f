"""DiLoCo groups: shards, rosters, who dials, and a whole reduce-scatter/all-gather in process."""

from __future__ import annotations

import asyncio

import pytest
import torch

from locoswarm.errors import PeerError, ProtocolViolation
from locoswarm.node.group import (
    GroupRound,
    dials,
    group_average,
    member_entry,
    parse_roster,
    shard_bounds,
)
from locoswarm.sync.diloco import group_mean


def test_shards_cover_the_vector_in_near_equal_parts() -> None:
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_bounds(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]


def test_roster_entries_are_checked() -> None:
    assert parse_roster([member_entry("a", "h:1"), member_entry("b", None)], "p") == [
        ("a", "h:1"),
        ("b", None),
    ]
    for bad in (["a"], ["a@h:1", "a@h:2"], ["@h:1", "b@"], ["a@h:1"]):
        with pytest.raises(ProtocolViolation):
            parse_roster(bad, "p")


def test_the_lower_index_dials_unless_only_the_other_can_be_dialled() -> None:
    members = [("a", "h:1"), ("b", "h:2"), ("c", None), ("d", None)]
    assert dials(members, 0, 1)
    assert not dials(members, 1, 0)
    assert not dials(members, 0, 2)  # a member without an address dials one with (gRPC)...
    assert dials(members, 2, 0)
    assert dials(members, 2, 3)  # ...and between two without, the lower index (libp2p)
    assert not dials(members, 3, 2)


async def _group(vectors: list[torch.Tensor], fail: str | None = None) -> list[torch.Tensor]:
    ids = [f"n{i}" for i in range(len(vectors))]
    roster = tuple(member_entry(p, f"127.0.0.1:{i}") for i, p in enumerate(ids))
    groups = {p: GroupRound() for p in ids}
    for g in groups.values():
        g.roster.set_result(roster)
    bounds = shard_bounds(vectors[0].numel(), len(ids))

    def swapper(me: str):
        async def swap(phase: str, peer: str, ours: torch.Tensor) -> torch.Tensor:
            if fail in (me, peer):
                raise PeerError(peer, "link down")
            other = groups[peer]
            # the callee hands back what its handler would: our shard of its vector, or its mean
            if phase == "rs":
                lo, hi = bounds[ids.index(me)]
                theirs = (await other.vector)[lo:hi]
            else:
                theirs = await other.reduced
            other.received(phase, me).set_result(ours.clone())
            return theirs.clone()

        return swap

    results = await asyncio.gather(
        *(
            group_average(groups[p], p, v, swapper(p), timeout_s=5)
            for p, v in zip(ids, vectors, strict=True)
        ),
        return_exceptions=True,
    )
    return results  # type: ignore[return-value]


async def test_every_member_ends_with_the_same_group_mean() -> None:
    gen = torch.Generator().manual_seed(0)
    vectors = [torch.randn(1001, generator=gen) for _ in range(4)]
    means = await _group(vectors)
    expected = group_mean(vectors)
    for mean in means:
        assert torch.equal(mean, means[0])  # bit-identical on every member
        torch.testing.assert_close(mean, expected)


async def test_a_failed_link_fails_the_group_step() -> None:
    vectors = [torch.ones(8) * i for i in range(3)]
    results = await _group(vectors, fail="n2")
    assert any(isinstance(r, BaseException) for r in results)
