"""The shared round (``sync/rounds.py``) as pure functions: torch parity, pair agreement, error
feedback bookkeeping, NoLoCo parity and what ``read`` refuses."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor

from locoswarm.compression.encoded import CorruptPayload
from locoswarm.sync import rounds
from locoswarm.sync.noloco import noloco_outer_step
from locoswarm.sync.round_config import RoundConfig, default_round_config
from locoswarm.sync.rounds import Message, OuterState

N = 1000  # not a multiple of the siq blocks


def _randn(seed: int, scale: float = 1.0, n: int = N) -> Tensor:
    return scale * torch.randn(n, generator=torch.Generator().manual_seed(seed))


def _exchange(
    cfg: RoundConfig,
    states: Sequence[OuterState],
    thetas: Sequence[Tensor],
    *,
    round: int = 0,
) -> tuple[list[OuterState], list[Message]]:
    """One group's round as every member computes it: members listed in one shared order."""
    msgs = [
        rounds.prepare(cfg, s, t, round=round)
        for i, (s, t) in enumerate(zip(states, thetas, strict=True))
    ]
    out = []
    for i, (state, msg) in enumerate(zip(states, msgs, strict=True)):
        members = [
            msg.own if j == i else rounds.read(cfg, msg, other.parts).tensors
            for j, other in enumerate(msgs)
        ]
        out.append(rounds.combine(cfg, state, msg, rounds.member_mean(members)))
    return out, msgs


def _distance(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max())


def test_all_reduce_diloco_with_shared_momentum_is_torch_nesterov_sgd() -> None:
    """fp32 proposals and momenta averaged over every member, from one shared state, are
    ``SGD(nesterov=True)`` on the mean pseudo-gradient (the DiLoCo paper's outer step)."""
    cfg = RoundConfig(mode="diloco", lr=0.7, momentum=0.9, share_momentum=True, bits=32,
                      momentum_bits=32)  # fmt: skip
    k = 4
    phi0 = _randn(0)
    states = [OuterState(phi=phi0.clone()) for _ in range(k)]
    param = torch.nn.Parameter(phi0.clone())
    sgd = torch.optim.SGD([param], lr=0.7, momentum=0.9, nesterov=True)
    for r in range(4):
        thetas = [s.phi - _randn(100 * r + i, 0.01) for i, s in enumerate(states)]
        param.grad = torch.stack([param.detach() - t for t in thetas]).mean(dim=0)
        sgd.step()
        states, _ = _exchange(cfg, states, thetas, round=r)
        for s in states[1:]:  # every member leaves with the same state
            assert torch.equal(s.phi, states[0].phi)
            assert s.momentum is not None
            assert states[0].momentum is not None
            assert torch.equal(s.momentum, states[0].momentum)
        torch.testing.assert_close(states[0].phi, param.detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(
            states[0].momentum, sgd.state[param]["momentum_buffer"], rtol=0, atol=1e-6
        )
    # Four rounds moved phi far beyond the tolerance: the comparison is not vacuous.
    assert _distance(states[0].phi, phi0) > 1e-2


def _pair_configs() -> dict[str, RoundConfig]:
    diloco = default_round_config("diloco")
    return {
        "diloco fp32": dataclasses.replace(diloco, bits=32, momentum_bits=32),
        "diloco private momentum": dataclasses.replace(diloco, bits=32, share_momentum=False),
        "diloco siq16": diloco,
        "ef 4 bits": default_round_config("ef"),
        "ef 8 bits": dataclasses.replace(default_round_config("ef"), bits=8),
    }


@pytest.mark.parametrize("name", list(_pair_configs()))
def test_pair_members_leave_with_identical_phi(name: str) -> None:
    """Every member leaves an exchange at least as close to its partners as it entered: a pair
    leaves with bit-identical phi, from states that disagree a little."""
    cfg = _pair_configs()[name]
    base = _randn(1)
    states = [
        OuterState(phi=base.clone(), momentum=_randn(2, 0.01)),
        OuterState(phi=base + _randn(3, 1e-4), momentum=_randn(4, 0.01)),
    ]
    if cfg.mode == "ef":  # fresh momenta, but residuals owed from earlier rounds
        states = [
            dataclasses.replace(s, residual=_randn(5 + i, 1e-3)) for i, s in enumerate(states)
        ]
    for r in range(3):
        thetas = [s.phi - _randn(10 * r + i, 0.01) for i, s in enumerate(states)]
        entered = _distance(states[0].phi, states[1].phi)
        states, msgs = _exchange(cfg, states, thetas, round=r)
        assert torch.equal(states[0].phi, states[1].phi), (name, r)
        assert _distance(states[0].phi, states[1].phi) <= entered
        # The proposals themselves differ: the agreement comes from the exchange.
        assert msgs[0].proposal is not None
        assert msgs[1].proposal is not None
        assert not torch.equal(msgs[0].proposal, msgs[1].proposal)
        # The next round starts with a little disagreement again (as a new partner brings).
        states = [states[0], dataclasses.replace(states[1], phi=states[1].phi + _randn(7, 1e-5))]


def test_one_bit_ef_pairs_leave_with_identical_phi() -> None:
    """Nearest rounding leaves 1-bit siq half a step of reach: enough for a pair to agree."""
    cfg = dataclasses.replace(default_round_config("ef"), bits=1)
    base = _randn(1)
    states = [OuterState(phi=base.clone()), OuterState(phi=base.clone())]
    thetas = [base - _randn(10, 0.01), base - _randn(11, 0.01)]
    new, msgs = _exchange(cfg, states, thetas)
    assert torch.equal(new[0].phi, new[1].phi)
    for i, msg in enumerate(msgs):
        got = rounds.read(cfg, msg, msgs[1 - i].parts)
        assert got.wrapped_blocks == 0
        assert torch.equal(got.tensors["proposal"], msgs[1 - i].own["proposal"])


def test_alone_keeps_the_ef_residual_and_combine_commits_it() -> None:
    cfg = default_round_config("ef")
    owed = _randn(20, 1e-3)
    state = OuterState(phi=_randn(21), residual=owed)
    theta = state.phi - _randn(22, 0.01)
    msg = rounds.prepare(cfg, state, theta, round=3)
    assert msg.sent is not None
    assert msg.proposal is not None

    solo = rounds.alone(cfg, state, msg)
    # Nothing was sent: all that was owed is still owed, and phi takes our own exact step.
    assert solo.residual is not None
    assert torch.equal(solo.residual, owed)
    assert torch.equal(solo.phi, msg.proposal)
    assert solo.momentum is not None
    assert msg.momentum is not None
    assert torch.equal(solo.momentum, msg.momentum)
    assert state.residual is owed  # inputs are never written
    assert torch.equal(owed, _randn(20, 1e-3))

    done = rounds.combine(cfg, state, msg, msg.own)
    assert done.residual is not None
    torch.testing.assert_close(done.residual, msg.sent - msg.own["proposal"], rtol=0, atol=0)
    assert not torch.equal(done.residual, owed)


@pytest.mark.parametrize("rounds_done", [0, 1, 2])
def test_ef_error_feedback_loses_nothing(rounds_done: int) -> None:
    """Sum over members of phi after the exchange = sum of proposals + what was owed before -
    what is owed after: every rounding error is either applied or still owed."""
    cfg = default_round_config("ef")
    base = _randn(30)
    states = [OuterState(phi=base.clone()), OuterState(phi=base.clone())]
    for r in range(rounds_done + 1):
        thetas = [s.phi - _randn(40 + 10 * r + i, 0.01) for i, s in enumerate(states)]
        before = states
        states, msgs = _exchange(cfg, before, thetas, round=r)

    def total(tensors: Sequence[Tensor | None]) -> Tensor:
        """The members' sum in float64 (a missing residual owes nothing)."""
        return torch.stack(
            [torch.zeros(N, dtype=torch.float64) if t is None else t.double() for t in tensors]
        ).sum(dim=0)

    assert all(s.residual is not None for s in states)
    owed_after = total([s.residual for s in states])
    assert float(owed_after.abs().max()) > 0  # the rounding did leave something owed
    phis = total([s.phi for s in states])
    proposals = total([m.proposal for m in msgs])
    owed_before = total([s.residual for s in before])
    torch.testing.assert_close(phis, proposals + owed_before - owed_after, rtol=0, atol=1e-6)


def test_ef_without_error_feedback_keeps_no_residual() -> None:
    cfg = dataclasses.replace(default_round_config("ef"), error_feedback=False)
    base = _randn(50)
    states = [OuterState(phi=base.clone()), OuterState(phi=base.clone())]
    thetas = [base - _randn(51, 0.01), base - _randn(52, 0.01)]
    states, _ = _exchange(cfg, states, thetas)
    assert all(s.residual is None for s in states)
    assert torch.equal(states[0].phi, states[1].phi)


@pytest.mark.parametrize("gamma", [None, 1.0])
def test_noloco_pair_combine_is_noloco_outer_step(gamma: float | None) -> None:
    cfg = RoundConfig(mode="noloco", lr=0.7, momentum=0.5, gamma=gamma)
    phis = [_randn(60), _randn(61)]
    deltas: list[Tensor | None] = [_randn(62, 0.01), None]  # the second member's first round
    states = [OuterState(phi=p, momentum=d) for p, d in zip(phis, deltas, strict=True)]
    thetas = [phis[0] - _randn(63, 0.01), phis[1] - _randn(64, 0.01)]
    new, msgs = _exchange(cfg, states, thetas)
    assert msgs[0].names == (("theta",) if gamma is None else ("theta", "phi"))
    for i in range(2):
        given = deltas[i]
        delta = torch.zeros(N) if given is None else given
        phi, d = noloco_outer_step(
            phis[i],
            delta,
            thetas,
            None if gamma is None else phis,
            alpha=0.5,
            beta=0.7,
            gamma=0.7 if gamma is None else gamma,
        )
        if gamma is None:  # theta-only form: the same operations, the same bits
            assert torch.equal(new[i].phi, phi)
        torch.testing.assert_close(new[i].phi, phi, rtol=0, atol=1e-6)
        assert new[i].momentum is not None
        torch.testing.assert_close(new[i].momentum, d, rtol=0, atol=1e-6)


def test_noloco_alone_is_the_solo_outer_step() -> None:
    cfg = default_round_config("noloco")
    phi, theta, delta = _randn(70), _randn(71), _randn(72, 0.01)
    state = OuterState(phi=phi, momentum=delta)
    msg = rounds.prepare(cfg, state, theta, round=0)
    new = rounds.alone(cfg, state, msg)
    want, want_delta = noloco_outer_step(
        phi, delta, [theta], None, alpha=cfg.momentum, beta=cfg.lr, gamma=cfg.lr
    )
    assert torch.equal(new.phi, want)
    assert new.momentum is not None
    assert torch.equal(new.momentum, want_delta)


def _messages(cfg: RoundConfig) -> tuple[Message, Message]:
    base = _randn(80)
    a = rounds.prepare(cfg, OuterState(phi=base), base - _randn(81, 0.01), round=0)
    b = rounds.prepare(cfg, OuterState(phi=base), base - _randn(82, 0.01), round=0)
    return a, b


@pytest.mark.parametrize("mode", ["noloco", "diloco", "ef"])
def test_read_rejects_a_message_with_wrong_names(mode: str) -> None:
    cfg = default_round_config(mode)  # type: ignore[arg-type]
    ours, theirs = _messages(cfg)
    assert rounds.read(cfg, ours, theirs.parts).tensors.keys() == set(ours.names)
    renamed = tuple(dataclasses.replace(p, name=p.name + "x") for p in theirs.parts)
    with pytest.raises(CorruptPayload, match="expected"):
        rounds.read(cfg, ours, renamed)
    with pytest.raises(CorruptPayload):
        rounds.read(cfg, ours, theirs.parts[:-1])  # a part missing
    with pytest.raises(CorruptPayload):
        rounds.read(cfg, ours, (*theirs.parts, theirs.parts[0]))  # a part too many


def test_read_rejects_a_wrong_shape_and_an_unexpected_codec() -> None:
    cfg = dataclasses.replace(default_round_config("diloco"), bits=32, momentum_bits=32)
    ours, theirs = _messages(cfg)
    short = rounds.prepare(cfg, OuterState(phi=_randn(83, n=N - 1)), _randn(84, n=N - 1), round=0)
    with pytest.raises(CorruptPayload, match="shape"):
        rounds.read(cfg, ours, short.parts)
    # A side-information part where an fp32 one belongs.
    siq = default_round_config("diloco")
    _, quantized = _messages(siq)
    with pytest.raises(CorruptPayload, match="side-information"):
        rounds.read(cfg, ours, quantized.parts)
    # And an fp32 part where a side-information one belongs.
    siq_ours, _ = _messages(siq)
    with pytest.raises(CorruptPayload, match="siq"):
        rounds.read(siq, siq_ours, theirs.parts)


def test_message_bytes_match_the_configured_width() -> None:
    ef = default_round_config("ef")  # 4 bits, blocks of 64
    msg, _ = _messages(ef)
    blocks = (N + 63) // 64
    # A bfloat16 step and a one-byte checksum per block, then the residues.
    assert msg.num_bytes == 3 * blocks + N // 2
    diloco = default_round_config("diloco")  # siq proposal and shared momentum
    msg, _ = _messages(diloco)
    assert msg.names == ("proposal", "momentum")
    blocks = (N + diloco.block_size - 1) // diloco.block_size
    widths = (diloco.bits, diloco.momentum_bits)
    assert msg.num_bytes == sum(3 * blocks + (N * b + 7) // 8 for b in widths)
    fp32 = dataclasses.replace(diloco, bits=32, momentum_bits=32)
    msg, _ = _messages(fp32)
    assert msg.num_bytes == 2 * 4 * N
    noloco = default_round_config("noloco")
    msg, _ = _messages(noloco)
    assert msg.num_bytes == 4 * N


@pytest.mark.parametrize(
    "cfg",
    [
        default_round_config("ef"),
        dataclasses.replace(default_round_config("ef"), bits=8, block_size=32),
        default_round_config("diloco"),
        dataclasses.replace(default_round_config("diloco"), momentum_bits=4, block_size=16),
        default_round_config("noloco"),
        RoundConfig(mode="noloco", gamma=1.0),
    ],
    ids=["ef4", "ef8-b32", "diloco16", "diloco16-m4-b16", "noloco", "noloco-phi"],
)
def test_bits_per_element_is_the_message_size(cfg: RoundConfig) -> None:
    """Payload bits per parameter: a side-information part costs b + 24 / block bits (bfloat16
    step and checksum per block) when the blocks divide the tensor."""
    n = 64 * 32
    base = _randn(85, n=n)
    msg = rounds.prepare(cfg, OuterState(phi=base), base - _randn(86, 0.01, n=n), round=1)
    assert 8 * msg.num_bytes / n == pytest.approx(cfg.bits_per_element(n), rel=1e-12)
    if cfg.mode == "ef":
        assert cfg.bits_per_element(n) == cfg.bits + 24 / cfg.block_size


def test_bits_per_element_of_the_pull_design_averages_a_cycle_for_this_size() -> None:
    """Pull: (pull_every - 1) codec messages of the step and one 16-bit proposal per cycle, the
    codec's cost measured on a tensor of the given size (its per-message overhead included)."""
    cfg = RoundConfig(mode="ef", design="pull", pull_every=4, codec="int8", block_size=64)
    cycle = 0
    for n in (3 * 64, 64 * 64):  # whole siq blocks
        base = _randn(87, n=n)
        sizes = [
            rounds.prepare(cfg, OuterState(phi=base), base - _randn(88, 0.01, n=n), round=r)
            for r in range(cfg.pull_every)
        ]
        assert [m.names for m in sizes] == [("proposal",)] + [("step",)] * 3
        cycle = sum(m.num_bytes for m in sizes)
        assert cfg.bits_per_element(n) == pytest.approx(8 * cycle / n / 4, rel=1e-12)
    # The codec's fixed overhead weighs more on a small tensor.
    assert cfg.bits_per_element(3 * 64) > cfg.bits_per_element(64 * 64)
    assert cycle > 0


def test_prepare_is_deterministic() -> None:
    """No seed: the same state, theta and round give the same message, bit for bit."""
    for mode in ("noloco", "diloco", "ef"):
        cfg = default_round_config(mode)
        base = _randn(89)
        state = OuterState(phi=base, momentum=_randn(90, 0.01), residual=_randn(91, 1e-3))
        theta = base - _randn(92, 0.01)
        a = rounds.prepare(cfg, state, theta, round=5)
        b = rounds.prepare(cfg, state, theta, round=5)
        assert [p.payload for p in a.parts] == [p.payload for p in b.parts], mode
        for name in a.own:
            assert torch.equal(a.own[name], b.own[name]), (mode, name)


@pytest.mark.parametrize("mode", ["ef", "diloco"])
def test_read_replaces_wrapped_blocks_with_our_own_entry(mode: str) -> None:
    """A partner whose proposal is out of the lattice's reach in some blocks: those blocks fail
    their checksum, are counted and take our own entry; every other block is the partner's."""
    cfg = default_round_config(mode)  # type: ignore[arg-type]
    block = cfg.block_size
    n = 4 * block
    base = _randn(93, n=n)
    theta = base - _randn(94, 0.01, n=n)
    ours = rounds.prepare(cfg, OuterState(phi=base), theta, round=0)
    # The partner's phi is far from ours in block 1 only, its own step as small as ours: its
    # lattice is sized from that step and cannot reach us there.
    far = base.clone()
    far[block : 2 * block] += 50.0
    theirs = rounds.prepare(cfg, OuterState(phi=far), far - _randn(95, 0.01, n=n), round=0)
    got = rounds.read(cfg, ours, theirs.parts)
    assert got.wrapped_blocks == 1
    proposal = got.tensors["proposal"]
    mine, sent = ours.own["proposal"], theirs.own["proposal"]
    assert torch.equal(proposal[block : 2 * block], mine[block : 2 * block])
    keep = torch.ones(n, dtype=torch.bool)
    keep[block : 2 * block] = False
    assert torch.equal(proposal[keep], sent[keep])
    assert not torch.equal(mine[keep], sent[keep])
    # The wrapped block then averages to our own value.
    mean = rounds.member_mean([ours.own, got.tensors])["proposal"]
    assert torch.equal(mean[block : 2 * block], mine[block : 2 * block])
    # Read back the other way round the partner's own vector decodes ours everywhere it reaches.
    back = rounds.read(cfg, theirs, ours.parts)
    assert back.wrapped_blocks >= 1
    assert rounds.read(cfg, ours, ours.parts).wrapped_blocks == 0


def test_disagreement_of_a_group_is_the_pair_distance_and_none_for_steps() -> None:
    cfg = dataclasses.replace(default_round_config("diloco"), bits=32, momentum_bits=32)
    state = OuterState(phi=_randn(1))
    a = rounds.prepare(cfg, state, state.phi - _randn(2, 0.01), round=0)
    b = rounds.prepare(cfg, state, state.phi - _randn(3, 0.01), round=0)
    ours, theirs = a.own["proposal"], b.own["proposal"]
    want = float((theirs - ours).norm() / ours.norm())
    got = rounds.disagreement(a, rounds.member_mean([a.own, b.own]))
    assert got == pytest.approx(want, rel=1e-5)
    assert rounds.disagreement(a, a.own) == 0.0  # alone: nothing to disagree with
    pull = dataclasses.replace(default_round_config("ef"), design="pull", pull_every=4)
    step_round = rounds.prepare(pull, state, state.phi - _randn(2, 0.01), round=1)
    assert step_round.names == ("step",)
    assert rounds.disagreement(step_round, step_round.own) is None


def test_pair_mean_into_is_member_mean_bit_for_bit_and_reuses_the_partner() -> None:
    own = {"a": _randn(5), "b": _randn(6, 1e-3)}
    theirs = {"a": _randn(7, 1e3), "b": _randn(8, 1e-7)}
    want = rounds.member_mean([own, theirs])
    kept = {k: v.clone() for k, v in own.items()}
    storage = theirs["a"].data_ptr()
    got = rounds.pair_mean_into(own, theirs)
    for name in want:
        assert torch.equal(got[name], want[name])
        assert torch.equal(own[name], kept[name])  # ours untouched
    assert got["a"].data_ptr() == storage  # no new tensor


@pytest.mark.parametrize(("n", "block"), [(1000, 64), (1001, 24), (5, 8)])
def test_block_max_in_chunks_is_the_whole_max(
    n: int, block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y = _randn(1, n=n), _randn(2, n=n)
    whole = rounds._block_max(x, block, minus=y)
    monkeypatch.setattr(rounds, "_CHUNK_BLOCKS_ELEMENTS", 3 * block)
    pad = (-n) % block
    want = torch.nn.functional.pad((x - y).abs(), (0, pad)).view(-1, block).amax(dim=1)
    assert torch.equal(rounds._block_max(x, block, minus=y), want)
    assert torch.equal(whole, want)
