"""Self-centred clipping of a partner's message and the bad peer's poisoned weights."""

from __future__ import annotations

import math

import pytest
import torch

from locoswarm.errors import ConfigError
from locoswarm.sync.robust import Clipper, poison, relative_distance
from locoswarm.sync.round_config import RoundConfig

CFG = RoundConfig(
    clip_factor=2.0, clip_window=4, clip_warmup=2, clip_initial=0.5, clip_violation=2.0
)


def test_relative_distance_by_hand() -> None:
    ours = torch.tensor([3.0, 4.0])  # |ours| = 5
    assert relative_distance(ours, torch.tensor([3.0, 5.0])) == pytest.approx(0.2)
    assert math.isnan(relative_distance(torch.zeros(2), ours))


def test_warmup_then_the_median_sets_the_threshold() -> None:
    clipper = Clipper(CFG)
    ours = {"theta": torch.tensor([3.0, 4.0])}
    assert clipper.threshold("theta") == 0.5  # nothing seen: clip_initial
    for d in (0.1, 0.3):
        clipper.clip(ours, {"theta": torch.tensor([3.0, 4.0 + 5 * d])})
    assert clipper.threshold("theta") == pytest.approx(2.0 * 0.2)  # factor x median(0.1, 0.3)
    for _ in range(4):  # the window keeps the last 4
        clipper.clip(ours, {"theta": torch.tensor([3.0, 4.5])})
    assert clipper.threshold("theta") == pytest.approx(2.0 * 0.1)
    assert clipper.state() == {"theta": [pytest.approx(0.1)] * 4}


def test_a_far_partner_is_pulled_to_the_threshold_along_its_direction() -> None:
    clipper = Clipper(CFG)
    ours = {"theta": torch.tensor([3.0, 4.0])}
    near = torch.tensor([3.0, 5.0])  # distance 0.2 < 0.5: untouched, the very tensor
    got, clips = clipper.clip(ours, {"theta": near})
    assert got["theta"] is near
    assert not clips[0].clipped
    far = torch.tensor([-30.0, -40.0])  # inverted and scaled: distance 11
    got, clips = clipper.clip(ours, {"theta": far})
    assert clips[0].clipped
    assert clips[0].distance == pytest.approx(11.0)
    assert clips[0].threshold == 0.5
    assert relative_distance(ours["theta"], got["theta"]) == pytest.approx(0.5)
    # on the segment from ours toward theirs: ours + 0.5/11 (theirs - ours)
    torch.testing.assert_close(got["theta"], ours["theta"] + (far - ours["theta"]) * (0.5 / 11))
    assert far.tolist() == [-30.0, -40.0]  # the caller's tensor is not written


@pytest.mark.parametrize("scale", [-3.0, 1.9, 40.0])  # lerp weights on both sides of 1/2
def test_clipping_in_the_partners_own_memory_gives_the_same_bits(scale: float) -> None:
    gen = torch.Generator().manual_seed(3)
    ours = {"w": torch.randn(200_003, generator=gen)}
    theirs = ours["w"] * scale + torch.randn(200_003, generator=gen)
    copy, new = Clipper(CFG), Clipper(CFG)
    want, want_clips = copy.clip(ours, {"w": theirs.clone()})
    given = theirs.clone()
    got, clips = new.clip(ours, {"w": given}, reuse=True)
    assert clips == want_clips
    assert clips[0].clipped
    assert got["w"] is given  # written in place: no new tensor
    assert torch.equal(got["w"].view(torch.int32), want["w"].view(torch.int32))
    assert copy.state() == new.state()


def test_clipping_off_and_a_zero_norm_clip_nothing() -> None:
    off = Clipper(RoundConfig(clip=False))
    far = torch.tensor([100.0, 0.0])
    got, clips = off.clip({"x": torch.tensor([1.0, 0.0])}, {"x": far})
    assert got["x"] is far
    assert not clips[0].clipped
    got, clips = Clipper(CFG).clip({"x": torch.zeros(2)}, {"x": far})
    assert got["x"] is far
    assert math.isnan(clips[0].distance)


def test_a_loaded_state_carries_on() -> None:
    a = Clipper(CFG)
    a.load({"theta": [0.1, 0.2, 0.3, 0.4, 0.5]})  # longer than the window: the last 4 stay
    assert a.threshold("theta") == pytest.approx(2.0 * 0.35)


@pytest.mark.parametrize(
    "kwargs",
    [{"clip_factor": 1.0}, {"clip_initial": 0.0}, {"clip_window": 0}, {"clip_warmup": 5}],
)
def test_bad_clip_settings_are_refused(kwargs: dict[str, float]) -> None:
    base = {"clip_window": 4, "clip_warmup": 2} | kwargs
    with pytest.raises(ConfigError, match="clip"):
        RoundConfig(**base)  # type: ignore[arg-type]


def test_poisoned_weights() -> None:
    theta = torch.tensor([1.0, -2.0, 3.0])
    torch.testing.assert_close(poison(theta, "scale", 10.0, seed=0), theta * 10)
    torch.testing.assert_close(poison(theta, "invert", 0.0, seed=0), -theta)
    noisy = poison(theta, "noise", 1.0, seed=3)
    torch.testing.assert_close(noisy, poison(theta, "noise", 1.0, seed=3))  # seeded
    assert not torch.equal(noisy, theta)
    with pytest.raises(ValueError, match="attack must be one of"):
        poison(theta, "flip", 1.0, seed=0)


def test_a_bad_partner_cannot_drag_the_threshold_up_and_is_blamed_only_far_out() -> None:
    clipper = Clipper(CFG)  # factor 2, window 4, warmup 2, violation beyond 2 thresholds
    ours = {"theta": torch.tensor([3.0, 4.0])}
    for _ in range(2):
        clipper.clip(ours, {"theta": torch.tensor([3.0, 4.5])})  # honest: 0.1
    assert clipper.threshold("theta") == pytest.approx(0.2)
    _, clips = clipper.clip(ours, {"theta": torch.tensor([3.0, 5.5])})  # 0.3: clipped only
    assert clips[0].clipped
    assert not clips[0].violation
    for _ in range(3):  # a bad partner, far out, again and again
        _, clips = clipper.clip(ours, {"theta": torch.tensor([-30.0, -40.0])})
        assert clips[0].violation
    # its distances entered as the threshold of the moment: the median stays near honest
    assert clipper.threshold("theta") <= 2.0 * 0.4 + 1e-6


def test_until_the_median_is_known_our_own_step_bounds_the_weights_threshold() -> None:
    clipper = Clipper(CFG)  # factor 2, initial 0.5
    assert clipper.threshold("theta", step=0.1) == pytest.approx(0.2)
    assert clipper.threshold("theta", step=1.0) == 0.5  # never above clip_initial
    phi = torch.tensor([3.0, 4.0])
    own = {"theta": torch.tensor([3.0, 4.5]), "momentum": torch.tensor([1.0, 0.0])}
    theirs = {"theta": torch.tensor([3.0, 6.5]), "momentum": torch.tensor([1.0, 0.4])}
    _, clips = clipper.clip(own, theirs, phi)  # our theta moved 0.1 from phi
    by_name = {c.name: c for c in clips}
    assert by_name["theta"].threshold == pytest.approx(2.0 * 0.5 / 5.0)
    assert by_name["theta"].clipped
    assert by_name["momentum"].threshold == 0.5  # not weights: clip_initial
    assert not by_name["momentum"].clipped


def test_before_the_median_is_known_blame_is_against_clip_initial() -> None:
    clipper = Clipper(CFG)  # warmup 2, initial 0.5, violation beyond 2 thresholds
    ours = {"theta": torch.tensor([3.0, 4.0])}
    phi = torch.tensor([3.0, 4.05])  # our own step 0.01: the threshold is 0.02
    _, clips = clipper.clip(ours, {"theta": torch.tensor([3.0, 8.0])}, phi)  # 0.8
    assert clips[0].clipped
    assert not clips[0].violation  # a late joiner's first exchange may look like this
    _, clips = clipper.clip(ours, {"theta": torch.tensor([-30.0, -40.0])}, phi)  # 11
    assert clips[0].violation
