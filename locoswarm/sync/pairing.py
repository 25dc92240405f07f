"""Deterministic random grouping of members for a NoLoCo outer step.

Every member that agrees on the seed, the counter and the member set computes the same groups
without talking to anyone. This module knows nothing about how the member set was agreed on
(membership, the DHT, handshakes), about liveness or about tensors: it maps ids to groups.

Source: NoLoCo reference code, ``jkolehm/noloco`` ``src/noloco/sparse_optimizer_c.py``
(``create_random_permutation`` and ``batched``); ``algorithms.md`` §1.3 and test vector T7.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any, Protocol, TypeVar

import numpy as np

__all__ = ["pairing", "reference_permutation"]


class _SortableId(Protocol):
    def __lt__(self, other: Any, /) -> bool: ...


T = TypeVar("T", bound=_SortableId)


def reference_permutation(step: int, num_members: int) -> list[int]:
    """The reference code's permutation, ``create_random_permutation(num_members, step)``.

    Args:
        step: The shared inner step count at sync time (50, 100, ... in the paper).
        num_members: Number of ranks to permute.

    Returns:
        ``numpy.random.default_rng(step + 1).permutation(num_members)`` as Python ints.
    """
    return [int(x) for x in np.random.default_rng(step + 1).permutation(num_members)]


def pairing(
    seed: int, round: int, members: Sequence[T], group_size: int = 2
) -> list[tuple[T, ...]]:
    """Split ``members`` into random groups that every member computes identically.

    Members are sorted first, so the order in which they are given does not matter. The
    permutation is ``numpy.random.default_rng([round + 1, seed]).permutation(len(members))``;
    with ``seed == 0`` this is the same stream as the reference's ``default_rng(round + 1)``, so
    integer members ``0..N-1`` get exactly the reference groups. With ``G = max(1, N //
    group_size)`` groups, ``perm[k]`` joins group ``k mod G`` (the reference's ``batched``).

    Odd-count policy (the reference asserts ``N % group_size == 0`` and crashes): members are
    dealt round-robin into the ``G`` groups, so when ``N`` is not a multiple of ``group_size``
    the leftover members join the first groups (the first ``N mod G`` groups get one extra).
    With ``group_size=2`` and an odd ``N`` the first group is a triple; the NoLoCo variance
    bound (arXiv:2506.10911 Eq. 74) still holds for a triple with alpha=0.5, gamma=0.7. Fewer
    than ``group_size`` members form one group; a single member forms a solo group; no members
    give ``[]``.

    NumPy does not promise the Generator stream across all versions; the reference values in
    the tests were produced with numpy 2.x.

    Args:
        seed: Swarm-wide seed (a run constant); 0 reproduces the reference.
        round: Whatever counter every member agrees on for this outer step. The reference
            passes its inner step count ``s`` (50, 100, ...).
        members: Distinct, sortable ids of the members taking part, this node included.
        group_size: Target members per group (2 in the paper).

    Returns:
        The groups in order, each a tuple of member ids; every member appears exactly once.

    Raises:
        ValueError: If ids repeat, ``group_size < 1``, or ``seed`` or ``round`` is negative.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if seed < 0 or round < 0:
        raise ValueError(f"seed and round must be >= 0, got seed={seed}, round={round}")
    ordered = sorted(members)
    for a, b in pairwise(ordered):
        if not a < b:
            raise ValueError(f"duplicate member id {a!r}")
    if not ordered:
        return []
    perm = np.random.default_rng([round + 1, seed]).permutation(len(ordered))
    num_groups = max(1, len(ordered) // group_size)
    groups: list[list[T]] = [[] for _ in range(num_groups)]
    for k, index in enumerate(perm):
        groups[k % num_groups].append(ordered[int(index)])
    return [tuple(g) for g in groups]
