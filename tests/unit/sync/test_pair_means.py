"""A pair's mean from a partner's side-information parts left encoded (``read(defer=True)`` and
``pair_means``): the same bits as decoding them whole, clipping and weighting them and taking
``pair_mean_into``, with the mean decoded into the tensor the caller gave up."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from locoswarm.compression.encoded import CorruptPayload
from locoswarm.compression.sideinfo import Sum, siq_encode, siq_steps
from locoswarm.sync import rounds
from locoswarm.sync.robust import DISTANCE_CHUNK, relative_distance
from locoswarm.sync.round_config import RoundConfig

N = 3 * DISTANCE_CHUNK + 100
"""Three whole chunks and a short one."""
BLOCK = 64


def _vector(seed: int, scale: float = 1.0) -> Tensor:
    return scale * torch.randn(N, generator=torch.Generator().manual_seed(seed))


def _message(value: Tensor, steps: Tensor, bits: int) -> rounds.Message:
    enc, hat = siq_encode(value, steps, bits=bits, block_size=BLOCK, name="proposal")
    return rounds.Message(
        0, (enc,), {"proposal": hat}, {"proposal": value}, proposal=value.clone(), momentum=None
    )


@pytest.mark.parametrize("bits", [4, 16])
@pytest.mark.parametrize("weight", [1.0, 0.25])
@pytest.mark.parametrize("shares", [None, (0.3, 0.7)])
def test_deferred_parts_give_the_same_mean_in_the_given_memory(
    bits: int, weight: float, shares: tuple[float, float] | None
) -> None:
    ours = _vector(1)
    theirs = ours + _vector(2, 0.01)
    # Out of the lattice's reach in two blocks (one in the last, short chunk): their checksums
    # fail and those blocks take our own entry.
    theirs[5 * BLOCK : 6 * BLOCK] += 50.0
    theirs[N - 30 :] -= 50.0
    steps = siq_steps(torch.full(((N + BLOCK - 1) // BLOCK,), 0.1), bits, 4.0)
    msg, other = _message(ours, steps, bits), _message(theirs, steps, bits)
    cfg = RoundConfig(mode="diloco", bits=bits, block_size=BLOCK)

    whole = rounds.read(cfg, msg, other.parts)
    deferred = rounds.read(cfg, msg, other.parts, defer=True)
    assert whole.wrapped_blocks == deferred.wrapped_blocks == 2
    assert deferred.tensors == {}
    assert set(deferred.deferred) == {"proposal"}
    own = msg.own["proposal"]
    # The distance clipping judges, summed while the part was checked: the same bits.
    assert deferred.distances["proposal"] == relative_distance(own, whole.tensors["proposal"])

    decoded = whole.tensors["proposal"]
    if weight != 1.0:
        decoded = torch.lerp(own, decoded, weight)
    want = rounds.pair_mean_into(msg.own, {"proposal": decoded}, shares)["proposal"]

    into = rounds.destinations(cfg, msg)
    assert into["proposal"] is msg.proposal
    state = rounds.OuterState(phi=ours)
    means, against = rounds.pair_means(
        cfg, state, msg, deferred, shares, {"proposal": weight}, into=into
    )
    got = means["proposal"]
    assert torch.equal(got, want)
    assert got.data_ptr() == into["proposal"].data_ptr()
    # Without a destination: a new tensor, the same bits.
    fresh, _ = rounds.pair_means(cfg, state, msg, deferred, shares, {"proposal": weight})
    assert torch.equal(fresh["proposal"], want)
    # What combine and disagreement read of our entry, measured on the way.
    assert against["proposal"].distance == relative_distance(own, want)
    assert against["proposal"].block_max is None  # diloco reads no bound of its proposal
    ef = RoundConfig(mode="ef", bits=bits, block_size=BLOCK)
    _, measured = rounds.pair_means(ef, state, msg, deferred, shares, {"proposal": weight})
    bound = measured["proposal"].block_max
    assert bound is not None
    assert torch.equal(bound, rounds._block_max(want, BLOCK, minus=own))


def test_destinations_leave_what_combine_reads() -> None:
    steps = siq_steps(torch.full(((N + BLOCK - 1) // BLOCK,), 0.1), 16, 4.0)
    value = _vector(3)
    msg = _message(value, steps, 16)
    # ef whose proposal is the value it sent: its residual is computed from it afterwards.
    ef = rounds.Message(0, msg.parts, msg.own, msg.side, proposal=value, momentum=None, sent=value)
    assert rounds.destinations(RoundConfig(mode="ef", bits=16, block_size=BLOCK), ef) == {}
    owed = rounds.Message(
        0, msg.parts, msg.own, msg.side, proposal=value, momentum=None, sent=value + 1
    )
    assert set(rounds.destinations(RoundConfig(mode="ef", bits=16, block_size=BLOCK), owed)) == {
        "proposal"
    }
    # Rotated ef rounds keep our own step outside the covered blocks.
    rotated = rounds.Message(
        0,
        msg.parts,
        msg.own,
        msg.side,
        proposal=value,
        momentum=None,
        sent=value + 1,
        index=torch.arange(N),
    )
    assert rounds.destinations(RoundConfig(mode="ef", bits=16, block_size=BLOCK), rotated) == {}
    # An unquantized proposal is our own entry of the mean: never written.
    plain = rounds.Message(0, msg.parts, {"proposal": value}, {}, proposal=value, momentum=None)
    assert rounds.destinations(RoundConfig(mode="diloco", bits=32), plain) == {}


def test_a_block_size_off_the_distance_chunks_is_decoded_whole() -> None:
    block = 48  # 65,536 is not a multiple of lcm(48, 8)
    n = 2 * DISTANCE_CHUNK
    value = torch.randn(n, generator=torch.Generator().manual_seed(4))
    steps = siq_steps(torch.full(((n + block - 1) // block,), 0.1), 16, 4.0)
    enc, hat = siq_encode(value, steps, bits=16, block_size=block, name="proposal")
    msg = rounds.Message(0, (enc,), {"proposal": hat}, {"proposal": value}, proposal=value)
    cfg = RoundConfig(mode="diloco", bits=16, block_size=block)
    partner = rounds.read(cfg, msg, msg.parts, defer=True)
    assert partner.deferred == {}
    assert torch.equal(partner.tensors["proposal"], hat)


def _clone(state: rounds.OuterState) -> rounds.OuterState:
    return rounds.OuterState.from_tensors({k: v.clone() for k, v in state.tensors().items()})


@pytest.mark.parametrize(
    ("mode", "overrides"),
    [
        ("diloco", {"bits": 16, "momentum_bits": 8, "share_momentum": True}),
        ("diloco", {"bits": 16, "momentum_bits": 16, "share_momentum": True}),
        ("ef", {"bits": 4}),
        ("ef", {"bits": 4, "design": "pull", "pull_every": 2}),  # round 2 pulls what is owed
    ],
)
@pytest.mark.parametrize("shares", [None, (0.4, 0.6)])
def test_a_message_without_our_own_entries_finishes_the_same_round(
    mode: str, overrides: dict[str, object], shares: tuple[float, float] | None
) -> None:
    """``prepare(keep_own=False)``: our own entries are decoded from our own parts where they
    are read; every round leaves the same state and disagreement as the whole path."""
    cfg = RoundConfig(mode=mode, block_size=BLOCK, **overrides)  # type: ignore[arg-type]
    n = DISTANCE_CHUNK + 100  # a whole chunk and a short one
    phi = _vector(10)[:n].clone()
    whole = [rounds.OuterState(phi=phi.clone()), rounds.OuterState(phi=phi.clone())]
    lazy = [_clone(s) for s in whole]
    sums = 0
    for r in range(3):
        thetas = [phi - _vector(20 + 2 * r, 0.01)[:n], phi - _vector(21 + 2 * r, 0.01)[:n]]
        msgs = [rounds.prepare(cfg, whole[i], thetas[i], round=r) for i in (0, 1)]
        theirs = rounds.read(cfg, msgs[0], msgs[1].parts).tensors
        means = rounds.pair_mean_into(msgs[0].own, theirs, shares)
        want_far = rounds.disagreement(msgs[0], means)
        want = rounds.combine(cfg, whole[0], msgs[0], means)

        starts = [_clone(s) for s in lazy]
        got_msgs = [
            rounds.prepare(cfg, lazy[i], thetas[i], round=r, keep_own=False) for i in (0, 1)
        ]
        assert [p.payload for p in got_msgs[0].parts] == [p.payload for p in msgs[0].parts]
        owed = lazy[0].residual
        summed = owed is not None and (cfg.design != "pull" or cfg.is_pull_round(r))
        sums += summed
        if summed:
            # The value sent is not held whole; our new residual takes the old one's memory.
            assert got_msgs[0].sent is None
            assert isinstance(got_msgs[0].side["proposal"], Sum)
            assert rounds.destinations(cfg, got_msgs[0])["residual"] is owed
        partner = rounds.read(cfg, got_msgs[0], got_msgs[1].parts, defer=True)
        assert partner.tensors == {} or set(partner.tensors) == {"step"}
        solo = starts[0]  # the state the round started from (a copy)
        got_means, against = rounds.pair_means(
            cfg,
            solo,
            got_msgs[0],
            partner,
            shares,
            into=rounds.destinations(cfg, got_msgs[0]),
            reuse_message=True,
        )
        assert rounds.disagreement(got_msgs[0], got_means, against=against) == want_far
        got = rounds.combine(
            cfg,
            solo,
            got_msgs[0],
            got_means,
            reuse_means=True,
            reuse_message=True,
            against=against,
        )
        if summed:
            assert got.residual is owed
        assert got.tensors().keys() == want.tensors().keys()
        for key, value in want.tensors().items():
            assert torch.equal(got.tensors()[key], value), (r, key)
        # The other member finishes its round the whole way, in both runs alike.
        other = rounds.read(cfg, msgs[1], msgs[0].parts).tensors
        flip = None if shares is None else (shares[1], shares[0])
        whole = [
            want,
            rounds.combine(cfg, whole[1], msgs[1], rounds.pair_mean_into(msgs[1].own, other, flip)),
        ]
        lazy = [got, _clone(whole[1])]
    assert sums == {"diloco": 0, "siq": 2, "pull": 1}[cfg.design if mode == "ef" else mode]


def test_a_partner_with_other_blocks_is_refused() -> None:
    """A side-information part must use our block size (a partner of the same round settings
    does; another block size would pick the decoder's chunk size)."""
    value = _vector(5)
    steps = siq_steps(torch.full(((N + BLOCK - 1) // BLOCK,), 0.1), 16, 4.0)
    msg = _message(value, steps, 16)
    other_steps = siq_steps(torch.full(((N + 2 * BLOCK - 1) // (2 * BLOCK),), 0.1), 16, 4.0)
    enc, _ = siq_encode(value, other_steps, bits=16, block_size=2 * BLOCK, name="proposal")
    cfg = RoundConfig(mode="diloco", bits=16, block_size=BLOCK)
    for defer in (False, True):
        with pytest.raises(CorruptPayload, match="block size"):
            rounds.read(cfg, msg, (enc,), defer=defer)


FUSED = [
    RoundConfig(mode="diloco", bits=16, block_size=BLOCK, share_momentum=True, momentum_bits=8),
    RoundConfig(mode="diloco", bits=8, block_size=BLOCK, share_momentum=True, momentum_bits=16),
    RoundConfig(mode="diloco", bits=16, block_size=BLOCK),
    RoundConfig(mode="ef", bits=4, block_size=BLOCK),
    RoundConfig(mode="ef", bits=4, block_size=BLOCK, error_feedback=False),
    RoundConfig(mode="ef", bits=2, block_size=BLOCK, design="pull", pull_every=1),
]


def _start(seed: int, residual: bool, momentum: bool = True) -> rounds.OuterState:
    blocks = (N + BLOCK - 1) // BLOCK
    return rounds.OuterState(
        phi=_vector(seed),
        momentum=_vector(seed + 1, 1e-3) if momentum else None,
        residual=_vector(seed + 2, 1e-4) if residual else None,
        bound=torch.full((blocks,), 2e-3),
        mbound=torch.full((blocks,), 1e-4),
    )


@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("cfg", FUSED, ids=lambda c: f"{c.mode}-{c.design}-{c.bits}")
def test_a_pair_round_prepared_in_the_old_state_is_the_same_message(
    cfg: RoundConfig, first: bool
) -> None:
    """prepare(in_place=True, keep_own=False) writes the step over the old phi and momentum:
    the same parts, proposal, momentum, side information and own step as the allocating path,
    and no tensor of the model's size beside them (``first``: no momentum yet, a new one)."""
    start = _start(10, residual=cfg.mode == "ef", momentum=not first)
    theta = start.phi - _vector(20, 1e-2)
    want = rounds.prepare(cfg, _clone(start), theta, round=3, keep_own=False)
    want_step = rounds.own_step(want, start.phi)
    given = _clone(start)
    got = rounds.prepare(cfg, given, theta, round=3, in_place=True, keep_own=False)
    assert got.proposal is given.phi  # the proposal in the old phi's memory
    if not first:
        assert got.momentum is given.momentum
    assert got.names == want.names
    for a, b in zip(got.parts, want.parts, strict=True):
        assert bytes(a.payload) == bytes(b.payload), a.name
    assert got.proposal is not None
    assert want.proposal is not None
    assert torch.equal(got.proposal, want.proposal)
    assert got.momentum is not None
    assert want.momentum is not None
    assert torch.equal(got.momentum, want.momentum)
    assert got.own == want.own == {}
    assert got.sent is None
    for name, value in want.side.items():
        mine = got.side[name]
        assert isinstance(mine, type(value))
        assert torch.equal(mine[0:N], value[0:N]), name
    assert want_step is not None
    assert got.moved == want_step
    assert rounds.own_step(got, given.phi) == want_step  # measured at prepare, not from phi
    if start.residual is not None:  # the residual owed is read at prepare, not written
        assert given.residual is not None
        assert torch.equal(given.residual, start.residual)


def test_a_step_that_is_not_finite_leaves_the_old_state_whole() -> None:
    cfg = RoundConfig(mode="ef", bits=4, block_size=BLOCK)
    start = _start(30, residual=True)
    theta = start.phi - _vector(31, 1e-2)
    theta[N - 5] = float("inf")  # in the last chunk: every other chunk passed its checks
    given = _clone(start)
    with pytest.raises(ValueError, match="NaN or Inf"):
        rounds.prepare(cfg, given, theta, round=0, in_place=True, keep_own=False)
    for name, t in start.tensors().items():
        assert torch.equal(given.tensors()[name], t), name
