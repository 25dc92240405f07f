"""The round's memory-saving paths (issue 14) give today's bits and write only into what the
caller gave up: chunked NoLoCo step, ``combine(reuse_means=..., reuse_message=...)``, the
in-place chunk work of ``siq_encode`` / ``siq_decode`` and ``_block_max``, each against the
straightforward whole-tensor formula."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor

from locoswarm.compression import sideinfo
from locoswarm.compression.sideinfo import siq_decode, siq_encode, siq_steps
from locoswarm.sync import noloco, rounds
from locoswarm.sync.noloco import noloco_outer_step, noloco_step_from_means
from locoswarm.sync.round_config import RoundConfig, default_round_config
from locoswarm.sync.rounds import OuterState

N = 1000  # not a multiple of the blocks or of the chunks below


def _randn(seed: int, scale: float = 1.0, n: int = N) -> Tensor:
    return scale * torch.randn(n, generator=torch.Generator().manual_seed(seed))


def _bits(t: Tensor) -> Tensor:
    return t.contiguous().view(torch.int32)


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks far smaller than the tensors, so every chunked path crosses chunk boundaries."""
    monkeypatch.setattr(noloco, "_CHUNK", 96)
    monkeypatch.setattr(rounds, "_CHUNK_BLOCKS_ELEMENTS", 128)
    monkeypatch.setattr(sideinfo, "CHUNK_ELEMENTS", 128)


@pytest.mark.parametrize("with_phis", [False, True])
@pytest.mark.parametrize("reuse", [False, True])
@pytest.mark.parametrize("reuse_delta", [False, True])
def test_noloco_step_from_means_is_the_outer_step_bit_for_bit(
    with_phis: bool, reuse: bool, reuse_delta: bool
) -> None:
    alpha, beta = 0.5, 0.7
    gamma = 0.3 if with_phis else beta
    phi, delta = _randn(1, 3.0), _randn(2, 1e-2)
    theta_mean = phi + _randn(3, 1e-3)
    phi_mean = phi + _randn(4, 1e-4) if with_phis else None
    want_phi, want_delta = noloco_outer_step(
        phi,
        delta,
        [theta_mean],
        None if phi_mean is None else [phi_mean],
        alpha=alpha,
        beta=beta,
        gamma=gamma,
    )
    tm = theta_mean.clone()
    pm = None if phi_mean is None else phi_mean.clone()
    kept = (phi.clone(), delta.clone())
    given_delta = delta.clone()
    got_phi, got_delta = noloco_step_from_means(
        phi,
        given_delta,
        tm,
        pm,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        reuse=reuse,
        reuse_delta=reuse_delta,
    )
    assert torch.equal(_bits(got_phi), _bits(want_phi))
    assert torch.equal(_bits(got_delta), _bits(want_delta))
    assert torch.equal(phi, kept[0])
    if reuse_delta:
        assert got_phi is given_delta  # the new phi in the old delta's memory
    else:
        assert torch.equal(given_delta, kept[1])
    if reuse:
        assert got_delta is tm  # computed in the given-up mean
    else:
        assert torch.equal(tm, theta_mean)
        assert pm is None or phi_mean is None or torch.equal(pm, phi_mean)


def _configs() -> list[RoundConfig]:
    out = [
        default_round_config("noloco"),
        dataclasses.replace(default_round_config("noloco"), gamma=0.3),
        dataclasses.replace(default_round_config("diloco"), momentum_bits=32, bits=32),
        dataclasses.replace(default_round_config("diloco"), momentum_bits=16, bits=4),
        default_round_config("diloco"),
        dataclasses.replace(default_round_config("diloco"), share_momentum=False, bits=8),
        default_round_config("ef"),
        dataclasses.replace(default_round_config("ef"), rotate=3),
        dataclasses.replace(default_round_config("ef"), error_feedback=False),
        dataclasses.replace(default_round_config("ef"), design="pull", pull_every=2),
    ]
    return out


def _snapshot(state: OuterState, theta: Tensor) -> list[Tensor]:
    return [theta.clone(), *(t.clone() for t in state.tensors().values())]


def _same(a: OuterState, b: OuterState) -> bool:
    ta, tb = a.tensors(), b.tensors()
    return ta.keys() == tb.keys() and all(torch.equal(_bits(ta[k]), _bits(tb[k])) for k in ta)


@pytest.mark.parametrize("cfg", _configs(), ids=lambda c: f"{c.mode}-{c.design}-{c.bits}")
@pytest.mark.parametrize("round", [1, 2])
def test_reuse_gives_the_same_state_and_writes_only_what_was_given_up(
    cfg: RoundConfig, round: int
) -> None:
    base = _randn(1)
    states = [
        OuterState(phi=base.clone(), momentum=_randn(5, 1e-3), residual=_randn(6, 1e-5)),
        OuterState(phi=base + _randn(2, 1e-4), momentum=_randn(7, 1e-3), residual=_randn(8, 1e-5)),
    ]
    if cfg.mode != "ef":
        states = [dataclasses.replace(s, residual=None) for s in states]
    thetas = [s.phi - _randn(10 + i, 0.01) for i, s in enumerate(states)]
    before = [_snapshot(s, t) for s, t in zip(states, thetas, strict=True)]

    def finish(i: int, reuse: bool, state: OuterState) -> tuple[OuterState, dict[str, Tensor]]:
        msgs = [
            rounds.prepare(cfg, state if j == i else s, t, round=round)
            for j, (s, t) in enumerate(zip(states, thetas, strict=True))
        ]
        own = {k: v.clone() for k, v in msgs[i].own.items()}
        got = rounds.read(cfg, msgs[i], msgs[1 - i].parts).tensors
        means = rounds.pair_mean_into(msgs[i].own, dict(got))
        new = rounds.combine(
            cfg,
            state,
            msgs[i],
            means,
            reuse_means=reuse,
            reuse_message=reuse,
            reuse_state=reuse and state is not states[i],
        )
        for k, v in own.items():  # our entry of the mean is never written
            assert torch.equal(msgs[i].own[k], v)
        return new, own

    for i in range(2):
        plain, _ = finish(i, False, states[i])
        reused, _ = finish(i, True, states[i])
        assert _same(plain, reused)
        # Given up as well: the state's own memory (noloco's new phi over the old delta).
        copy = OuterState(**{k: v.clone() for k, v in states[i].tensors().items()})
        in_place, _ = finish(i, True, copy)
        assert _same(plain, in_place)
        if cfg.mode == "noloco":
            assert copy.momentum is not None
            assert in_place.phi.data_ptr() == copy.momentum.data_ptr()
    after = [_snapshot(s, t) for s, t in zip(states, thetas, strict=True)]
    for old, new in zip(before, after, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(old, new, strict=True))


@pytest.mark.parametrize("cfg", _configs(), ids=lambda c: f"{c.mode}-{c.design}-{c.bits}")
def test_alone_and_prepare_leave_state_and_theta_unchanged(cfg: RoundConfig) -> None:
    state = OuterState(phi=_randn(1), momentum=_randn(2, 1e-3))
    if cfg.mode == "ef":
        state = dataclasses.replace(state, residual=_randn(3, 1e-5))
    theta = state.phi - _randn(4, 0.01)
    before = _snapshot(state, theta)
    msg = rounds.prepare(cfg, state, theta, round=1)
    rounds.alone(cfg, state, msg)
    rounds.alone(cfg, state, msg)
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(state, theta), strict=True))
    if cfg.mode == "noloco":
        assert msg.own["theta"] is theta  # the trainer's snapshot, read in place, never written


def test_ef_residual_in_the_given_up_message_is_sent_minus_own() -> None:
    cfg = default_round_config("ef")
    state = OuterState(phi=_randn(1), momentum=_randn(2, 1e-3), residual=_randn(3, 1e-5))
    msg = rounds.prepare(cfg, state, state.phi - _randn(4, 0.01), round=1)
    assert msg.sent is not None
    want = msg.sent - msg.own["proposal"]
    new = rounds.combine(cfg, state, msg, dict(msg.own), reuse_message=True)
    assert new.residual is not None
    assert new.residual.data_ptr() == msg.sent.data_ptr()  # no new tensor
    assert torch.equal(_bits(new.residual), _bits(want))


@pytest.mark.parametrize("bits", [1, 4, 8, 16])
@pytest.mark.parametrize("block_size", [7, 64])
def test_siq_matches_the_whole_tensor_formula(bits: int, block_size: int) -> None:
    v = _randn(1)
    side = v + _randn(2, 1e-3)
    kept = (v.clone(), side.clone())
    blocks = (N + block_size - 1) // block_size
    bound = torch.full((blocks,), 2e-3)
    steps = siq_steps(bound, bits, 4.0)
    s = steps.double().repeat_interleave(block_size)[:N]
    index = torch.floor(v.double() / s + 0.5)
    enc, hat = siq_encode(v, steps, bits=bits, block_size=block_size)
    assert torch.equal(_bits(hat), _bits((index * s).float()))
    modulus = float(2**bits)
    residue = torch.remainder(index, modulus)
    want_index = residue + modulus * torch.round((side.double() / s - residue) / modulus)
    values, bad = siq_decode(enc, side)
    assert torch.equal(_bits(values), _bits((want_index * s).float()))
    assert not bool(bad.any())
    assert torch.equal(v, kept[0])
    assert torch.equal(side, kept[1])


@pytest.mark.parametrize("minus", [False, True])
def test_block_max_matches_the_whole_tensor_formula(minus: bool) -> None:
    x, y = _randn(1), _randn(2)
    diff = (x - y if minus else x).abs()
    want = torch.nn.functional.pad(diff, (0, (-N) % 64)).view(-1, 64).amax(dim=1)
    got = rounds._block_max(x, 64, minus=y if minus else None)
    assert torch.equal(_bits(got), _bits(want))
