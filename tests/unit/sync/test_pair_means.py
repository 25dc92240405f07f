"""A pair's mean from a partner's side-information parts left encoded (``read(defer=True)`` and
``pair_means``): the same bits as decoding them whole, clipping and weighting them and taking
``pair_mean_into``, with the mean decoded into the tensor the caller gave up."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from locoswarm.compression.sideinfo import siq_encode, siq_steps
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
    got = rounds.pair_means(msg, deferred, shares, {"proposal": weight}, into=into)["proposal"]
    assert torch.equal(got, want)
    assert got.data_ptr() == into["proposal"].data_ptr()
    # Without a destination: a new tensor, the same bits.
    fresh = rounds.pair_means(msg, deferred, shares, {"proposal": weight})["proposal"]
    assert torch.equal(fresh, want)


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
