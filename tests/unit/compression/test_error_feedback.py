"""Error feedback: compression.md section 6 vectors T1, T2, T7, two-phase commit and checkpoints."""

from __future__ import annotations

import pytest
import torch

from locoswarm.compression import get_codec
from locoswarm.compression.error_feedback import EF14, EControl, NoFeedback, make_feedback
from locoswarm.errors import ConfigError


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def test_t1_topk_ef14_sequence_and_invariant() -> None:
    ef = EF14(get_codec("topk", topk_ratio=0.25))
    gs = [t(0.5, -2, 1, 0.25), t(0.5, 0.5, 0.5, 0.125), t(0, 0, 0, 0)]
    expected_c = [t(0, -2, 0, 0), t(0, 0, 1.5, 0), t(1, 0, 0, 0)]
    expected_e = [t(0.5, 0, 1, 0.25), t(1, 0.5, 0, 0.375), t(0, 0.5, 0, 0.375)]
    sent = torch.zeros(4)
    for g, c, e in zip(gs, expected_c, expected_e, strict=True):
        pending = ef.prepare("w", g)
        assert torch.equal(pending.decoded, c)
        ef.commit(pending)
        assert torch.equal(ef.residual["w"], e)
        sent += pending.decoded
    # Nothing lost: everything sent plus what is left equals everything put in.
    assert torch.equal(sent + ef.residual["w"], gs[0] + gs[1] + gs[2])


def test_t2_scaled_sign_ef14() -> None:
    ef = EF14(get_codec("sign"))
    p1 = ef.prepare("w", t(1, -2, 3, -4))
    assert torch.equal(p1.decoded, t(2.5, -2.5, 2.5, -2.5))
    ef.commit(p1)
    assert torch.equal(ef.residual["w"], t(-1.5, 0.5, 0.5, -1.5))
    p2 = ef.prepare("w", t(1, 1, 1, 1))
    assert torch.equal(p2.compressed_input, t(-0.5, 1.5, 1.5, -0.5))
    assert torch.equal(p2.decoded, t(-1, 1, 1, -1))
    ef.commit(p2)
    assert torch.equal(ef.residual["w"], t(0.5, 0.5, 0.5, 0.5))
    assert torch.equal(p1.decoded + p2.decoded + ef.residual["w"], t(2, -1, 4, -3))


def test_t7_econtrol_vector_and_invariant() -> None:
    ec = EControl(get_codec("topk", topk_ratio=0.5), eta=0.5)  # d = 2 -> k = 1
    g = t(3, 1)
    x = torch.zeros(2)
    expected = [
        (t(3, 0), t(3, 0), t(0, 1), t(-3, 0)),
        (t(0, 1.5), t(3, 1.5), t(0, 0.5), t(-6, -1.5)),
        (t(0, -0.25), t(3, 1.25), t(0, 0.25), t(-9, -2.75)),
        (t(0, -0.125), t(3, 1.125), t(0, 0.125), t(-12, -3.875)),
    ]
    for step, (delta, h, e, x_next) in enumerate(expected, start=1):
        pending = ec.prepare("w", g)
        assert torch.equal(pending.decoded, delta)
        ec.commit(pending)
        x = x - ec.estimate["w"]  # the receiver steps with the estimator, gamma = 1
        assert torch.equal(ec.estimate["w"], h)
        assert torch.equal(ec.error["w"], e)
        assert torch.equal(x, x_next)
        assert torch.equal(x - ec.error["w"], -step * g)


@pytest.mark.parametrize("codec", ["int8", "int4", "sign", "topk"])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_econtrol_invariant_holds_for_any_codec_and_eta(codec: str, eta: float) -> None:
    gen = torch.Generator().manual_seed(7)
    ec = EControl(get_codec(codec, block_size=64, topk_ratio=0.1), eta=eta)
    x = torch.zeros(300, dtype=torch.float32)
    total = torch.zeros(300)
    for _ in range(6):
        g = torch.randn(300, generator=gen)
        total += g
        pending = ec.prepare("w", g)
        ec.commit(pending)
        x = x - ec.estimate["w"]
        assert torch.allclose(x - ec.error["w"], -total, atol=1e-4)


@pytest.mark.parametrize("codec", ["int8", "int4", "sign", "topk"])
def test_ef14_conserves_mass_for_any_codec(codec: str) -> None:
    gen = torch.Generator().manual_seed(3)
    ef = EF14(get_codec(codec, block_size=64, topk_ratio=0.05))
    sent = torch.zeros(500)
    total = torch.zeros(500)
    for _ in range(8):
        g = torch.randn(500, generator=gen)
        total += g
        pending = ef.prepare("w", g)
        ef.commit(pending)
        sent += pending.decoded
    assert torch.allclose(sent + ef.residual["w"], total, atol=1e-4)


def test_a_lost_exchange_leaves_the_whole_value_in_the_residual() -> None:
    ef = EF14(get_codec("topk", topk_ratio=0.25))
    ef.commit(ef.prepare("w", t(0.5, -2, 1, 0.25)))  # residual [0.5, 0, 1, 0.25]
    lost = ef.prepare("w", t(0.5, 0.5, 0.5, 0.125))
    ef.abort(lost)
    assert torch.equal(ef.residual["w"], t(1, 0.5, 1.5, 0.375))
    # The next message carries it: nothing was lost, only delayed.
    later = ef.prepare("w", torch.zeros(4))
    assert torch.equal(later.compressed_input, t(1, 0.5, 1.5, 0.375))


def test_econtrol_abort_is_an_empty_delivery() -> None:
    ec = EControl(get_codec("topk", topk_ratio=0.5), eta=0.5)
    ec.commit(ec.prepare("w", t(3, 1)))
    before_h = ec.estimate["w"].clone()
    ec.abort(ec.prepare("w", t(3, 1)))
    assert torch.equal(ec.estimate["w"], before_h)
    assert torch.equal(ec.error["w"], t(0, 1) + t(3, 1) - before_h)


def test_prepare_does_not_touch_state() -> None:
    ef = EF14(get_codec("int8"))
    ef.commit(ef.prepare("w", torch.randn(100)))
    before = ef.residual["w"].clone()
    ef.prepare("w", torch.randn(100))
    assert torch.equal(ef.residual["w"], before)


def test_state_dict_round_trip() -> None:
    gen = torch.Generator().manual_seed(0)
    for fb in (EF14(get_codec("int4")), EControl(get_codec("sign"), eta=0.5)):
        fb.commit(fb.prepare("a", torch.randn(50, generator=gen)))
        clone = make_feedback("ef14" if isinstance(fb, EF14) else "econtrol", fb.codec)
        clone.load_state_dict(fb.state_dict())
        g = torch.randn(50, generator=gen)
        assert fb.prepare("a", g).encoded.payload == clone.prepare("a", g).encoded.payload


def test_no_feedback_drops_the_error() -> None:
    fb = NoFeedback(get_codec("sign"))
    pending = fb.prepare("w", t(1, -2, 3, -4))
    fb.commit(pending)
    assert fb.state_dict() == {}


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="error_feedback"):
        make_feedback("ef21", get_codec("int8"))
    with pytest.raises(ConfigError, match="eta"):
        EControl(get_codec("int8"), eta=1.5)
