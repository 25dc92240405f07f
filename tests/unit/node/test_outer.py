"""The node's outer step (``node/outer.py``) around ``sync/rounds.py``: a pair's messages through
the wire format, the same state as the shared round computes, solo steps, and checkpoints that
hold the whole outer state."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from torch import Tensor

from locoswarm.compression.encoded import CorruptPayload
from locoswarm.errors import ProtocolViolation
from locoswarm.node.config import load_config
from locoswarm.node.outer import OuterStep, Prepared
from locoswarm.protocol import Received
from locoswarm.protocol.frames import payload_bytes
from locoswarm.sync import rounds
from locoswarm.sync.robust import Clipper

N = 700


def _randn(seed: int, scale: float = 1.0) -> Tensor:
    return scale * torch.randn(N, generator=torch.Generator().manual_seed(seed))


def _pair(mode: str) -> tuple[OuterStep, OuterStep]:
    config = load_config(None, {"sync.mode": mode}, {})
    phi = _randn(0)
    return (
        OuterStep(config, phi, peer_id="a", fp="f"),
        OuterStep(config, phi, peer_id="b", fp="f"),
    )


def _wire(prepared: Prepared) -> Received:
    return Received(prepared.outgoing.header, payload_bytes(prepared.outgoing.payload))


@pytest.mark.parametrize("mode", ["noloco", "diloco", "ef"])
def test_a_pair_through_the_wire_computes_the_shared_round(mode: str) -> None:
    a, b = _pair(mode)
    start = a.phi.clone()  # a round may write over the state it starts from
    clipper = Clipper(a.rc)
    for r in range(3):
        thetas = [a.phi - _randn(10 + r, 0.01), b.phi - _randn(20 + r, 0.01)]
        before = (a.state, b.state)
        # What the shared round computes from the same states and thetas (before the node's
        # round: it works in the old state's memory).
        msg_a = rounds.prepare(a.rc, before[0], thetas[0], round=r)
        msg_b = rounds.prepare(a.rc, before[1], thetas[1], round=r)
        theirs = rounds.read(a.rc, msg_a, msg_b.parts).tensors
        # Clipped toward ours as the node clips (diloco's momenta lie farther apart than the
        # initial threshold).
        theirs, _ = clipper.clip(msg_a.own, theirs, before[0].phi)
        want = rounds.combine(a.rc, before[0], msg_a, rounds.member_mean([msg_a.own, theirs]))
        pa, pb = a.prepare(r, thetas[0]), b.prepare(r, thetas[1])
        assert pa.outgoing.header.total_bytes == pa.message.num_bytes
        assert payload_bytes(pa.outgoing.payload) == b"".join(  # the same message
            payload_bytes(p.payload) for p in msg_a.parts
        )
        got_a, got_b = a.decode(_wire(pb)), b.decode(_wire(pa))
        assert a.heard == {"b": r}
        assert b.heard == {"a": r}
        (phi_a, far_a, _), (phi_b, far_b, _) = a.apply(pa, got_a), b.apply(pb, got_b)
        assert torch.equal(phi_a, want.phi)
        assert a.phi is phi_a
        # The whole state: momentum, ef's residual, the lattices' bounds.
        assert a.state.tensors().keys() == want.tensors().keys()
        assert all(torch.equal(a.state.tensors()[k], v) for k, v in want.tensors().items())
        # From the first round: noloco's delta then is zeros made for it; diloco and ef write
        # their proposal over the old phi (their first momentum is a new tensor).
        assert a.in_place == r + 1
        # diloco's and ef's mean is decoded into their solo result from the first round (ef's
        # round 0, with nothing owed, reads each chunk of the value sent, its proposal, before it
        # writes the mean there).
        assert a.in_place_means == {"noloco": 0, "diloco": r + 1, "ef": r + 1}[mode]
        # The disagreement: how far the weights each side sent were apart, relative to ours.
        name = "phi" if "phi" in msg_a.own else msg_a.names[0]
        ours, other = msg_a.own[name], msg_b.own[name]
        assert far_a == pytest.approx(float((other - ours).norm() / ours.norm()), rel=1e-4)
        assert far_b == pytest.approx(float((other - ours).norm() / other.norm()), rel=1e-4)
        assert far_a is not None
        assert far_a > 0
        if mode != "noloco":  # proposal averaging: the pair leaves with the same phi
            assert torch.equal(phi_a, phi_b)
    assert not torch.equal(a.phi, start)
    assert a.wrapped_blocks == b.wrapped_blocks == 0


def test_a_payload_changed_after_its_check_leaves_a_whole_state() -> None:
    """The pair's mean is decoded into our solo result, a whole chunk at a time; when that
    fails part way (the payload was checked, so only a fault of ours can), every chunk holds
    either the mean or our own step, never half of one: here it fails at the first chunk, and
    the state is our solo result as it was."""
    a, b = _pair("diloco")
    for r in range(2):  # the second round has a momentum to share
        pa, pb = a.prepare(r, a.phi - _randn(80 + r, 0.01)), b.prepare(r, b.phi - _randn(90 + r))
        wire = _wire(pb)
        payload = bytearray(wire.payload)
        partner = a.decode(Received(wire.header, payload))
        if r == 0:
            a.apply(pa, partner)
            b.apply(pb, b.decode(_wire(pa)))
    assert set(partner.deferred) == {"proposal", "momentum"}  # left encoded
    solo = {k: v.clone() for k, v in a.state.tensors().items()}
    # The proposal's first block step (bfloat16) becomes a NaN after the check.
    payload[0:2] = b"\xc0\x7f"
    with pytest.raises(CorruptPayload, match="step"):
        a.apply(pa, partner)
    assert all(torch.equal(a.state.tensors()[k], v) for k, v in solo.items())
    assert a.snapshot[0] == 2


def _own(msg: rounds.Message, name: str) -> Tensor:
    """Our own entry of ``name``, whole (kept, or decoded from our own part)."""
    return torch.cat([chunk.clone() for _, _, chunk in rounds.own_chunks(msg, name)])


def test_solo_is_the_rounds_alone_step() -> None:
    a, _ = _pair("ef")
    theta = a.phi - _randn(30, 0.01)
    state = rounds.OuterState.from_tensors({k: v.clone() for k, v in a.state.tensors().items()})
    prepared = a.prepare(0, theta)  # in the state's memory
    phi = a.solo(prepared)
    want = rounds.alone(a.rc, state, rounds.prepare(a.rc, state, theta, round=0))
    assert torch.equal(phi, want.phi)
    # Nothing was sent, so nothing of what the message compressed is owed yet.
    assert a.state.residual is None


def test_decode_needs_an_open_round_and_rejects_a_wrong_message() -> None:
    a, b = _pair("ef")
    pb = b.prepare(0, b.phi - _randn(40, 0.01))
    with pytest.raises(ProtocolViolation, match="no round is open"):
        a.decode(_wire(pb))
    pa = a.prepare(0, a.phi - _randn(41, 0.01))
    a.decode(_wire(pb))
    a.apply(pa, a.decode(_wire(pb)))
    with pytest.raises(ProtocolViolation, match="no round is open"):
        a.decode(_wire(pb))  # the round is finished
    a.prepare(1, a.phi)
    noloco, _ = _pair("noloco")
    other = noloco.prepare(1, noloco.phi - _randn(42, 0.01))
    with pytest.raises(ProtocolViolation):
        a.decode(_wire(other))  # an fp32 theta where a quantized proposal belongs


@pytest.mark.parametrize("mode", ["diloco", "ef"])
def test_checkpoints_hold_the_whole_outer_state(mode: str) -> None:
    a, b = _pair(mode)
    pa = a.prepare(0, a.phi - _randn(50, 0.01))
    pb = b.prepare(0, b.phi - _randn(51, 0.01))
    a.apply(pa, a.decode(_wire(pb)))
    saved = a.state_dict()
    assert set(saved) == {"state", "next_round", "clip"}
    assert saved["next_round"] == 1
    assert set(saved["state"]) == set(a.state.tensors())
    assert {"phi", "momentum"} <= set(saved["state"])
    if mode == "ef":  # what is owed and the distance seen survive a restart
        assert {"residual", "bound"} <= set(saved["state"])
    fresh, _ = _pair(mode)
    written = io.BytesIO()  # through a file's bytes, as a checkpoint is
    torch.save(saved, written)
    written.seek(0)
    fresh.load_state_dict(torch.load(written))
    assert fresh.next_round == 1
    for name, tensor in a.state.tensors().items():
        assert torch.equal(fresh.state.tensors()[name], tensor), name
    # The restored node prepares the same next message, bit for bit.
    theta = a.phi - _randn(52, 0.01)
    assert fresh.prepare(1, theta).outgoing.payload == a.prepare(1, theta).outgoing.payload


def test_state_payload_carries_phi_and_momentum_for_a_late_joiner() -> None:
    a, b = _pair("diloco")
    pa = a.prepare(0, a.phi - _randn(60, 0.01))
    pb = b.prepare(0, b.phi - _randn(61, 0.01))
    a.apply(pa, a.decode(_wire(pb)))
    joiner, _ = _pair("diloco")
    out = a.state_payload()
    assert out.header.outer_step == 1  # the round that follows the state it carries
    joiner.load_state_payload(Received(out.header, payload_bytes(out.payload)))
    assert joiner.next_round == 1
    assert torch.equal(joiner.phi, a.phi)
    assert joiner.momentum is not None
    assert a.momentum is not None
    assert torch.equal(joiner.momentum, a.momentum)


def test_a_reader_sees_one_rounds_state_and_its_label_together() -> None:
    a, b = _pair("diloco")
    noloco, c = _pair("noloco")
    before_round, before = noloco.snapshot
    pn, pc = noloco.prepare(4, noloco.phi - _randn(74, 0.01)), c.prepare(4, c.phi - _randn(75))
    # While noloco's round 4 is open, readers get the state it started from, labelled round 4's
    # start (its solo result would be a new phi: not made unless needed).
    started = noloco.state_payload()
    assert started.header.outer_step == before_round
    got = noloco.decode(
        Received(started.header, payload_bytes(started.payload)), ("phi", "momentum")
    )
    assert torch.equal(got[0], before.phi)
    noloco.apply(pn, noloco.decode(_wire(pc)))
    assert noloco.snapshot[0] == 5
    # diloco swaps in its solo result at prepare: readers get it, labelled as the round's end.
    before = a.state
    pa = a.prepare(4, a.phi - _randn(70, 0.01))
    pb = b.prepare(4, b.phi - _randn(71, 0.01))
    open_round = a.state_payload()
    assert open_round.header.outer_step == 5
    got = a.decode(
        Received(open_round.header, payload_bytes(open_round.payload)), ("phi", "momentum")
    )
    assert pa.message.proposal is not None
    assert torch.equal(got[0], pa.message.proposal)
    a.apply(pa, a.decode(_wire(pb)))
    after_round, after = a.snapshot
    assert after_round == 5
    out = a.state_payload()
    assert out.header.outer_step == 5
    phi, momentum = a.decode(Received(out.header, payload_bytes(out.payload)), ("phi", "momentum"))
    assert torch.equal(phi, after.phi)
    assert after.momentum is not None
    assert torch.equal(momentum, after.momentum)
    assert before.phi is not after.phi  # the old value was replaced, never written into
    del open_round, out  # the readers are done: their leases end
    # Round 5 starts with a momentum, computed over the old one's memory (round 4 wrote only
    # its proposal over the old phi): readers get the round's solo result, labelled as the
    # round's end, and never half a state.
    pa = a.prepare(5, a.phi - _randn(72, 0.01))
    pb = b.prepare(5, b.phi - _randn(73, 0.01))
    assert a.in_place == 2
    mid = a.state_payload()
    assert mid.header.outer_step == 6
    got = a.decode(Received(mid.header, payload_bytes(mid.payload)), ("phi", "momentum"))
    assert pa.message.proposal is not None
    assert torch.equal(got[0], pa.message.proposal)
    assert pa.message.momentum is not None
    assert torch.equal(got[1], pa.message.momentum)
    sent = payload_bytes(mid.payload)
    a.apply(pa, a.decode(_wire(pb)))
    assert payload_bytes(mid.payload) == sent  # leased: the round wrote nothing into it
    assert a.snapshot[0] == 6
    assert not torch.equal(a.phi, got[0])  # the pair's mean replaced the solo result


@pytest.mark.parametrize("reader", ["fetch_state", "checkpoint", "none"])
def test_a_round_writes_over_the_old_state_only_while_nobody_reads_it(reader: str) -> None:
    a, b = _pair("noloco")
    for r in range(2):  # round 0's delta is zeros made for it; round 1's is the state's
        pa, pb = a.prepare(r, a.phi - _randn(80 + r, 0.01)), b.prepare(r, b.phi - _randn(90 + r))
        old = a.state
        out = a.state_payload() if reader == "fetch_state" else None
        sent = None if out is None else payload_bytes(out.payload)
        with a.reading() if reader == "checkpoint" else contextlib.nullcontext():
            a.apply(pa, a.decode(_wire(pb)))
        assert old.momentum is None or (a.phi.data_ptr() == old.momentum.data_ptr()) == (
            reader == "none"
        )
        if out is not None:  # what the late joiner is being sent is still the old state
            assert payload_bytes(out.payload) == sent
            del out
    assert a.in_place == (2 if reader == "none" else 0)
    # Leases end with their reader: the next round writes in place again.
    pa, pb = a.prepare(2, a.phi - _randn(82, 0.01)), b.prepare(2, b.phi - _randn(92))
    a.apply(pa, a.decode(_wire(pb)))
    assert a.in_place == (3 if reader == "none" else 1)


def test_a_group_members_shard_records_the_round_it_came_from() -> None:
    # Group members may be a round apart (the lag window); the round event names each member's
    # own round, so a shard must record it as a pair's message does.
    config = load_config(None, {"sync.mode": "diloco", "sync.group_size": 3, "sync.bits": 32}, {})
    a = OuterStep(config, _randn(0), peer_id="a", fp="f")
    b = OuterStep(config, _randn(0), peer_id="b", fp="f")
    a.prepare(5, a.phi)
    out = b.shard_message(4, "reduce", _randn(1)[:10], ("a", "b", "c"))
    shard = a.decode_shard(Received(out.header, payload_bytes(out.payload)), 10)
    assert shard.shape == (10,)
    assert a.heard == {"b": 4}


@pytest.mark.parametrize("mode", ["diloco", "ef"])
def test_a_pair_round_writes_its_proposal_over_the_old_phi(mode: str) -> None:
    a, b = _pair(mode)
    pa, pb = a.prepare(0, a.phi - _randn(100, 0.01)), b.prepare(0, b.phi - _randn(101, 0.01))
    a.apply(pa, a.decode(_wire(pb)))
    b.apply(pb, b.decode(_wire(pa)))
    del pa, pb
    assert a.momentum is not None
    old_phi, old_momentum = a.phi.data_ptr(), a.momentum.data_ptr()
    theta = a.phi - _randn(102, 0.01)
    want = rounds.own_step(
        rounds.prepare(a.rc, a.state, theta, round=1, keep_own=False), a.phi.clone()
    )
    pa, pb = a.prepare(1, theta), b.prepare(1, b.phi - _randn(103, 0.01))
    assert a.in_place == 2  # round 0 too (its momentum a new tensor)
    # No copy of the old phi beside the proposal: the solo result is the old state's memory.
    assert pa.message.proposal is a.phi
    assert a.phi.data_ptr() == old_phi
    assert a.momentum is not None
    assert a.momentum.data_ptr() == old_momentum
    assert pa.step == want  # measured from the old phi before it was written over
    assert pa.step is not None
    assert pa.step > 0
    phi, _, clips = a.apply(pa, a.decode(_wire(pb)))
    assert [c.name for c in clips] == list(pa.message.names)
    assert a.phi is phi


def test_a_theta_that_fails_its_checks_leaves_the_state_as_it_was() -> None:
    a, b = _pair("diloco")
    pa, pb = a.prepare(0, a.phi - _randn(110, 0.01)), b.prepare(0, b.phi - _randn(111, 0.01))
    a.apply(pa, a.decode(_wire(pb)))
    del pa, pb
    label, state = a.snapshot
    kept = {k: v.clone() for k, v in state.tensors().items()}
    bad = a.phi.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        a.prepare(1, bad)
    assert a.snapshot == (label, state)
    assert all(torch.equal(state.tensors()[k], v) for k, v in kept.items())


def test_a_prepare_that_fails_after_the_momentum_was_overwritten_drops_the_momentum(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = _pair("ef")
    pa, pb = a.prepare(0, a.phi - _randn(112, 0.01)), b.prepare(0, b.phi - _randn(113, 0.01))
    a.apply(pa, a.decode(_wire(pb)))
    del pa, pb
    label, state = a.snapshot

    def fail(*args: object, **kwargs: object) -> object:
        raise MemoryError("no room for the quantized proposal")

    monkeypatch.setattr(rounds, "_siq_part", fail)  # after the Nesterov step, in place
    with pytest.raises(MemoryError):
        a.prepare(1, a.phi - _randn(114, 0.01))
    assert a.next_round == label
    assert a.momentum is None  # never half a round's momentum
    assert a.phi is state.phi
    assert a.state.residual is state.residual


@pytest.mark.parametrize("mode", ["noloco", "diloco", "ef"])
def test_a_round_that_ends_without_an_outcome_hands_the_trainer_its_step_once(mode: str) -> None:
    a, b = _pair(mode)
    theta = a.phi - _randn(120, 0.01)
    assert a.phi_after(0, theta) is theta  # nothing prepared: theta keeps its progress
    pa = a.prepare(0, theta)
    if mode == "noloco":  # the state is the round's start: the step is in theta alone
        assert a.phi_after(0, theta) is theta
    else:  # the solo result is in: the trainer takes it, as from a solo round
        assert pa.message.proposal is not None
        assert a.phi_after(0, theta) is pa.message.proposal
    pb = b.prepare(0, b.phi - _randn(121, 0.01))
    phi, _, _ = a.apply(pa, a.decode(_wire(pb)))
    assert a.phi_after(0, theta) is phi  # finished (an error after it): the round's result


@pytest.mark.parametrize("mode", ["noloco", "diloco", "ef"])
def test_a_bad_peers_message_is_made_from_the_same_start_state(mode: str) -> None:
    a, b = _pair(mode)
    pa, pb = a.prepare(0, a.phi - _randn(130, 0.01)), b.prepare(0, b.phi - _randn(131, 0.01))
    a.apply(pa, a.decode(_wire(pb)))
    del pa, pb
    start = {k: v.clone() for k, v in a.state.tensors().items()}  # prepare may overwrite it
    theta, bad = a.phi - _randn(132, 0.01), -a.phi
    want_bad = rounds.prepare(a.rc, rounds.OuterState.from_tensors(start), bad, round=1)
    want_ours = rounds.prepare(a.rc, rounds.OuterState.from_tensors(start), theta, round=1)
    prepared = a.prepare(1, theta, bad)
    assert payload_bytes(prepared.outgoing.payload) == b"".join(
        payload_bytes(p.payload) for p in want_bad.parts
    )
    assert all(  # our own round goes on with our honest message
        torch.equal(_own(prepared.message, k), v) for k, v in want_ours.own.items()
    )
