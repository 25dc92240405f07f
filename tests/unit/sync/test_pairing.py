"""Group drawing: algorithms.md T7 (reference reproduction) and the odd-count policy."""

from __future__ import annotations

import random

import numpy as np
import pytest

from locoswarm.sync.pairing import pairing, reference_permutation

# (N, step, permutation, groups with n=2) from algorithms.md T7, numpy 2.x PCG64.
T7 = [
    (4, 50, [1, 2, 3, 0], [(1, 3), (2, 0)]),
    (8, 50, [3, 1, 0, 6, 5, 2, 7, 4], [(3, 5), (1, 2), (0, 7), (6, 4)]),
    (8, 100, [5, 1, 0, 4, 7, 3, 6, 2], [(5, 7), (1, 3), (0, 6), (4, 2)]),
    (
        16,
        50,
        [1, 15, 0, 13, 5, 9, 8, 7, 3, 14, 11, 10, 2, 6, 4, 12],
        [(1, 3), (15, 14), (0, 11), (13, 10), (5, 2), (9, 6), (8, 4), (7, 12)],
    ),
]


def _covers_once(groups, members) -> bool:
    flat = [m for g in groups for m in g]
    return sorted(flat) == sorted(members)


@pytest.mark.parametrize(("n", "step", "perm", "groups"), T7)
def test_t7_reference_permutation(n, step, perm, groups):
    assert reference_permutation(step, n) == perm


@pytest.mark.parametrize(("n", "step", "perm", "groups"), T7)
def test_t7_groups_with_seed_zero(n, step, perm, groups):
    assert pairing(0, step, list(range(n))) == groups


@pytest.mark.parametrize("round_", [0, 1, 49, 50, 100, 25_000, 2**32 - 2, 2**32 + 5, 2**63])
def test_seed_zero_stream_equals_reference_stream(round_):
    ours = np.random.default_rng([round_ + 1, 0]).permutation(32)
    ref = np.random.default_rng(round_ + 1).permutation(32)
    assert ours.tolist() == ref.tolist()


def test_nonzero_seed_gives_a_different_draw():
    members = list(range(16))
    assert pairing(1, 50, members) != pairing(0, 50, members)
    assert pairing(12345, 50, members) != pairing(0, 50, members)
    assert pairing(1, 50, members) == pairing(1, 50, members)


def test_round_changes_the_draw():
    members = list(range(16))
    assert pairing(0, 50, members) != pairing(0, 100, members)


def test_odd_count_five():
    members = list(range(5))
    groups = pairing(0, 50, members)
    perm = reference_permutation(50, 5)
    # G = 5 // 2 = 2; perm[k] joins group k mod 2, so the leftover perm[4] makes group 0 a triple.
    assert groups == [(perm[0], perm[2], perm[4]), (perm[1], perm[3])]
    assert _covers_once(groups, members)


def test_odd_count_three_is_one_triple():
    groups = pairing(0, 50, [0, 1, 2])
    assert len(groups) == 1
    assert sorted(groups[0]) == [0, 1, 2]


def test_single_member_is_solo_and_empty_is_empty():
    assert pairing(0, 50, ["only"]) == [("only",)]
    assert pairing(0, 50, []) == []


@pytest.mark.parametrize("n", range(12))
@pytest.mark.parametrize("group_size", [1, 2, 3, 4])
def test_policy_covers_every_member_once(n, group_size):
    members = list(range(n))
    groups = pairing(7, 100, members, group_size)
    assert _covers_once(groups, members)
    if n == 0:
        assert groups == []
        return
    num_groups = max(1, n // group_size)
    assert len(groups) == num_groups
    # Round-robin deal: the first n mod G groups hold one extra member.
    base, extra = divmod(n, num_groups)
    assert [len(g) for g in groups] == [base + 1] * extra + [base] * (num_groups - extra)
    if n >= group_size:
        assert base >= group_size


def test_member_order_does_not_matter():
    members = [f"peer-{i:02d}" for i in range(9)]
    shuffled = members[:]
    random.Random(0).shuffle(shuffled)
    assert shuffled != members
    assert pairing(3, 150, shuffled) == pairing(3, 150, members)
    assert pairing(3, 150, tuple(reversed(members))) == pairing(3, 150, members)


def test_string_ids_follow_sorted_order():
    members = ["d", "b", "a", "c"]
    perm = reference_permutation(50, 4)
    ordered = sorted(members)
    assert pairing(0, 50, members) == [
        (ordered[perm[0]], ordered[perm[2]]),
        (ordered[perm[1]], ordered[perm[3]]),
    ]


def test_rejects_duplicates():
    with pytest.raises(ValueError, match="duplicate"):
        pairing(0, 50, [1, 2, 2, 3])


@pytest.mark.parametrize(
    ("seed", "round_", "group_size", "match"),
    [(0, 50, 0, "group_size"), (-1, 50, 2, "seed"), (0, -1, 2, "round")],
)
def test_rejects_bad_arguments(seed, round_, group_size, match):
    with pytest.raises(ValueError, match=match):
        pairing(seed, round_, [0, 1], group_size)
