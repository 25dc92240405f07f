"""Groups weight their members by the tokens each trained (``rounds.member_shares``)."""

from __future__ import annotations

import pytest
import torch

from locoswarm.sync import rounds
from locoswarm.sync.diloco import group_mean


def test_equal_or_missing_weights_mean_the_plain_mean() -> None:
    assert rounds.member_shares([512, 512], 8.0) is None
    assert rounds.member_shares([512, 0], 8.0) is None  # a member that gave none
    assert rounds.member_shares([512], 8.0) is None


def test_shares_follow_the_tokens_and_are_capped() -> None:
    assert rounds.member_shares([2048, 1024], 8.0) == pytest.approx([2 / 3, 1 / 3])
    # A claim of 1000 times the tokens counts for at most 8 times the lightest member.
    assert rounds.member_shares([1000, 1], 8.0) == pytest.approx([8 / 9, 1 / 9])
    shares = rounds.member_shares([3, 1, 2], 8.0)
    assert shares is not None
    assert sum(shares) == pytest.approx(1.0)


def test_both_members_of_a_pair_compute_the_same_bits() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3000, generator=gen), torch.randn(3000, generator=gen)
    shares = rounds.member_shares([2048, 1024], 8.0)
    assert shares is not None
    reverse = rounds.member_shares([1024, 2048], 8.0)
    assert reverse == [shares[1], shares[0]]
    at_a = rounds.pair_mean_into({"x": a}, {"x": b.clone()}, (shares[0], shares[1]))["x"]
    at_b = rounds.pair_mean_into({"x": b}, {"x": a.clone()}, (shares[1], shares[0]))["x"]
    assert torch.equal(at_a, at_b)
    # ... the same bits as the simulator's mean in either order, and the weighted formula.
    sim = rounds.member_mean([{"x": a}, {"x": b}], shares)["x"]
    sim_reverse = rounds.member_mean([{"x": b}, {"x": a}], reverse)["x"]
    assert torch.equal(at_a, sim)
    assert torch.equal(at_a, sim_reverse)
    torch.testing.assert_close(at_a, (2 * a + b) / 3)


def test_a_weighted_pair_mean_works_through_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rounds, "_MEAN_CHUNK", 7)
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(50, generator=gen), torch.randn(50, generator=gen)
    got = rounds.pair_mean_into({"x": a}, {"x": b.clone()}, (0.25, 0.75))["x"]
    assert torch.equal(got, rounds.weighted_mean([a, b], [0.25, 0.75]))


def test_equal_shares_keep_the_plain_mean_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(1000, generator=gen), torch.randn(1000, generator=gen)
    plain = rounds.pair_mean_into({"x": a}, {"x": b.clone()})["x"]
    assert torch.equal(plain, group_mean([a, b]))
    assert torch.equal(rounds.member_mean([{"x": a}, {"x": b}])["x"], plain)


def test_weighted_mean_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="shares"):
        rounds.weighted_mean([torch.zeros(2)], [0.5, 0.5])


def test_disagreement_scales_with_the_partners_share() -> None:
    ours, theirs = torch.ones(4), torch.full((4,), 2.0)
    msg = rounds.Message(0, (rounds.fp32_part(ours, "proposal"),), {"proposal": ours})
    plain = rounds.disagreement(msg, {"proposal": (ours + theirs) / 2})
    weighted = rounds.disagreement(msg, {"proposal": ours * 0.75 + theirs * 0.25}, 1 / 0.25)
    assert plain == pytest.approx(1.0)
    assert weighted == pytest.approx(1.0)
