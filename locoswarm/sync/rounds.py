"""One outer round of every sync mode, as pure functions, driven by the simulator and the daemon.

A round, for one member of a group (a pair, a group of k, or itself alone):

    msg   = prepare(cfg, state, theta, round=r)           # our message and private step
    parts = msg.parts                                     # what goes on the wire (Encoded)
    got   = read(cfg, msg, partner_parts).tensors         # a partner's tensors, decoded with our
                                                          #   own vectors as side information
    state = combine(cfg, state, msg, member_mean([...]))  # the group's means, in a shared order
    state = alone(cfg, state, msg)                        # no partner, or the exchange failed

Modes (``consensus.md``):

- ``noloco``: the paper's update on the group's thetas (and phis when gamma != beta).
- ``diloco``: proposal averaging (§3.1). Each member takes its own Nesterov step on its own
  pseudo-gradient, ``m <- mu m + D``, ``p = phi - lr (D + mu m)``, and the group averages the
  proposals, so every member leaves with the same phi. With ``share_momentum`` the momenta are
  averaged too (sent with side-information quantization, ``momentum_bits``), so no private state
  re-injects disagreement; without it each member keeps its own.
- ``ef``: the same proposals, compressed. Design ``siq`` sends the proposal at ``bits`` per element
  with side-information quantization (§3.2): the partner's own proposal recovers the coarse part,
  both members reconstruct the same values and leave with the same phi; the rounding error is
  kept in a residual and sent with the next proposal (error feedback, committed only when the
  exchange completed). Design ``pull`` sends the proposal's step ``p - phi`` through an
  error-feedback codec every round and the whole proposal at 16 bits every ``pull_every``
  rounds (§3.3).

Every function returns new tensors and never writes into its inputs, except into what its caller
gives up: ``combine`` (``reuse_means``, ``reuse_message``, ``reuse_state``) and ``prepare``
(``in_place``: the state's momentum, and in a pair's siq round its phi). Knows nothing about peers,
sockets, asyncio or how a group was formed.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from locoswarm.compression.codecs import decode, get_codec
from locoswarm.compression.encoded import (
    DEFAULT_LIMITS,
    CorruptPayload,
    DecodeLimits,
    Encoded,
    check_finite,
    flatten_input,
)
from locoswarm.compression.sideinfo import (
    Sum,
    Vector,
    siq_decode,
    siq_decode_chunks,
    siq_encode,
    siq_hat,
    siq_hat_chunks,
    siq_steps,
)
from locoswarm.sync.diloco import group_mean
from locoswarm.sync.noloco import noloco_step_from_means
from locoswarm.sync.robust import DISTANCE_CHUNK, Distance, lerp_into, relative_distance
from locoswarm.sync.round_config import RoundConfig

__all__ = [
    "Against",
    "Message",
    "OuterState",
    "Partner",
    "RoundConfig",
    "alone",
    "combine",
    "compatible_rounds",
    "destinations",
    "disagreement",
    "fp32_part",
    "member_mean",
    "member_shares",
    "message_names",
    "own_chunks",
    "own_step",
    "pair_mean_into",
    "pair_means",
    "prepare",
    "read",
    "spread_of",
    "weighted_mean",
]


@dataclass(frozen=True, slots=True)
class OuterState:
    """A member's outer state, swapped as one value."""

    phi: Tensor
    momentum: Tensor | None = None
    residual: Tensor | None = None
    """ef: what earlier messages owed the swarm (rounding error, or the codec's EF residual)."""
    bound: Tensor | None = None
    """siq: per block, the largest distance to a partner's proposal seen at the last exchange."""
    mbound: Tensor | None = None
    """siq: the same for a shared momentum."""

    def tensors(self) -> dict[str, Tensor]:
        out = {"phi": self.phi}
        for key in ("momentum", "residual", "bound", "mbound"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> OuterState:
        return cls(
            phi=tensors["phi"],
            momentum=tensors.get("momentum"),
            residual=tensors.get("residual"),
            bound=tensors.get("bound"),
            mbound=tensors.get("mbound"),
        )


@dataclass(frozen=True, slots=True)
class Message:
    """One member's message for one round and what it needs to finish the round."""

    round: int
    parts: tuple[Encoded, ...]
    """On the wire, in order (``Encoded.name`` is the tensor's name)."""
    own: dict[str, Tensor]
    """What every partner reconstructs from our parts (our entry of the group's means)."""
    side: dict[str, Vector] = field(default_factory=dict)
    """Our vectors that decode partners' side-information parts, by name (ef's value sent, when
    not held whole, a ``Sum`` of the proposal and the residual owed)."""
    proposal: Tensor | None = None
    """phi after our own step alone (diloco, ef)."""
    momentum: Tensor | None = None
    """Our momentum after our own step (diloco, ef) or noloco's current delta."""
    sent: Tensor | None = None
    """ef: the value we compressed (proposal or step plus residual); None where it is not held
    whole (``prepare(keep_own=False)``: ``side``'s ``Sum``)."""
    index: Tensor | None = None
    """ef rotate: the elements this round's message covers (None: all)."""
    moved: float | None = None
    """``own_step`` of this message, measured at prepare where the proposal was written over
    the phi it moved from (``prepare(in_place=True, keep_own=False)``); None: not measured."""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parts)

    @property
    def num_bytes(self) -> int:
        return sum(p.num_bytes for p in self.parts)


def message_names(cfg: RoundConfig, round: int) -> tuple[str, ...]:
    """Tensor names of a message of ``round``, in order."""
    if cfg.mode == "noloco":
        return ("theta",) if cfg.theta_only else ("theta", "phi")
    if cfg.mode == "ef":
        if cfg.design == "siq":
            return (_rotated("proposal", cfg, round),)
        return ("proposal",) if cfg.is_pull_round(round) else ("step",)
    return ("proposal", "momentum") if cfg.share_momentum else ("proposal",)


def _rotated(name: str, cfg: RoundConfig, round: int) -> str:
    """A rotated message names its phase: partners in different phases cannot mix blocks."""
    return name if cfg.rotate == 1 else f"{name}/{round % cfg.rotate}"


def compatible_rounds(cfg: RoundConfig, ours: int, theirs: int) -> bool:
    """Whether messages of these two round labels can be combined."""
    if cfg.mode == "ef" and cfg.design == "siq":
        return (ours - theirs) % cfg.rotate == 0
    if cfg.mode == "ef" and cfg.design == "pull":
        return cfg.is_pull_round(ours) == cfg.is_pull_round(theirs)
    return True


def _selected(cfg: RoundConfig, numel: int, round: int) -> Tensor | None:
    """Element indices of this round's blocks (None: every element)."""
    if cfg.rotate == 1:
        return None
    blocks = (numel + cfg.block_size - 1) // cfg.block_size
    chosen = torch.arange(blocks)[(torch.arange(blocks) + round) % cfg.rotate == 0]
    index = (chosen.unsqueeze(1) * cfg.block_size + torch.arange(cfg.block_size)).reshape(-1)
    return index[index < numel]


def fp32_part(t: Tensor, name: str) -> Encoded:
    """An fp32 part. Every tensor a round sends is never changed in place, so on a
    little-endian CPU the part is a view of the tensor's memory, not a copy of it."""
    if (
        sys.byteorder == "little"
        and t.dtype == torch.float32
        and t.device.type == "cpu"
        and t.is_contiguous()
    ):
        flat = flatten_input(t, codec="fp32", name=name)
        check_finite(flat, codec="fp32", name=name, what="values")
        view = flat.detach().numpy().data.cast("B")
        return Encoded(codec="fp32", shape=tuple(t.shape), dtype="float32", payload=view, name=name)
    return get_codec("fp32").encode(t, name=name)


_CHUNK_BLOCKS_ELEMENTS = 1 << 16
"""Chunked work (``_block_max``) goes through about this many elements at a time (whole
blocks)."""


def _block_max(x: Vector, block_size: int, minus: Tensor | None = None) -> Tensor:
    """Per block of ``block_size``, the largest ``|x|`` (or ``|x - minus|``), a chunk of whole
    blocks at a time: no temporary the size of the model (a maximum is exact in any order)."""
    n = x.numel()
    blocks = (n + block_size - 1) // block_size
    out = torch.empty(blocks, dtype=x.dtype)
    step = block_size * max(1, _CHUNK_BLOCKS_ELEMENTS // block_size)
    for i0 in range(0, n, step):
        i1 = min(n, i0 + step)
        part = x[i0:i1].abs() if minus is None else (x[i0:i1] - minus[i0:i1]).abs_()
        out[i0 // block_size : (i1 + block_size - 1) // block_size] = _blocks_max(part, block_size)
    return out


def _blocks_max(part: Tensor, block_size: int) -> Tensor:
    """Per block of ``block_size`` of ``part`` (whole blocks from its start; values >= 0), the
    largest; a last partial block is padded with zeros."""
    pad = (-part.numel()) % block_size
    if pad:
        part = torch.nn.functional.pad(part, (0, pad))
    return part.view(-1, block_size).amax(dim=1)


def _block_values(per_block: Tensor, index: Tensor, block_size: int) -> Tensor:
    """The entries of a per-block tensor for the blocks that ``index`` (whole blocks) covers."""
    return per_block[index[::block_size] // block_size]


_STEP_CHUNK = DISTANCE_CHUNK
"""Our own Nesterov step is taken this many elements at a time (whole blocks wherever the round
works in chunks: ``_aligned``, and ``relative_distance``'s chunks): every operation is per
element, so its bits do not depend on where a chunk starts, and its temporaries are chunk-sized."""


def _step_chunks(n: int, block_size: int) -> Iterator[tuple[int, int, int, int]]:
    """(first element, end, first block, end block) of each of the step's chunks."""
    for i0 in range(0, n, _STEP_CHUNK):
        i1 = min(n, i0 + _STEP_CHUNK)
        yield i0, i1, i0 // block_size, (i1 + block_size - 1) // block_size


def _step_chunk(
    cfg: RoundConfig,
    phi: Tensor,
    theta: Tensor,
    momentum: Tensor | None,
    i0: int,
    i1: int,
    *,
    away: bool = False,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Our own Nesterov step on elements ``[i0, i1)`` of the flat ``phi``, ``theta`` and
    ``momentum`` (None: the first step), in torch SGD(nesterov=True)'s op order: (``|phi -
    theta|`` where ``away``, else None; the new momentum; the proposal), new chunk-sized
    tensors. Reads its inputs, never writes them."""
    g = phi[i0:i1] - theta[i0:i1]
    apart = g.abs() if away else None  # the same bits as _block_max(phi, minus=theta)'s
    m = g.clone() if momentum is None else momentum[i0:i1].mul(cfg.momentum).add_(g)
    g.add_(m, alpha=cfg.momentum)
    return apart, m, torch.add(phi[i0:i1], g, alpha=-cfg.lr, out=g)  # the proposal in g's memory


def _nesterov(
    cfg: RoundConfig, state: OuterState, theta: Tensor, in_place: bool = False
) -> tuple[Tensor, Tensor]:
    """Our own Nesterov step: (proposal, momentum), a chunk at a time (``_step_chunk``).
    ``in_place``: the new momentum is written over the old one (each chunk read before it is
    written: the same bits)."""
    shape = state.phi.shape
    phi, flat_theta = state.phi.reshape(-1), theta.reshape(-1)
    old = None if state.momentum is None else state.momentum.reshape(-1)
    n = phi.numel()
    proposal = torch.empty(n, dtype=phi.dtype)
    if in_place and state.momentum is not None and state.momentum.is_contiguous():
        momentum = state.momentum.view(-1)
    else:
        momentum = torch.empty(n, dtype=phi.dtype)
    for i0, i1, _, _ in _step_chunks(n, cfg.block_size):
        _, m, p = _step_chunk(cfg, phi, flat_theta, old, i0, i1)
        momentum[i0:i1] = m
        proposal[i0:i1] = p
    return proposal.view(shape), momentum.view(shape)


def prepare(
    cfg: RoundConfig,
    state: OuterState,
    theta: Tensor,
    *,
    round: int,
    in_place: bool = False,
    keep_own: bool = True,
) -> Message:
    """Our message for ``round`` from the fast weights ``theta`` (CPU work).

    ``in_place`` (diloco, ef): nobody reads ``state``'s momentum or phi after this call (the
    caller swaps in ``alone(cfg, state, msg)`` at once and holds off the state's other readers):
    the new momentum is computed in the old one's memory, and in a pair's round with a siq
    proposal (``keep_own`` False, ``_prepare_in_place``) the proposal in the old phi's, which
    ``own_step`` then no longer reads (the message carries it, ``Message.moved``). The same
    message either way.

    ``keep_own`` False (a pair's round that finishes with ``read(defer=True)`` and
    ``pair_means``): our own entry of a side-information part is not kept in ``own``; whoever
    needs it reads it a chunk at a time (``own_chunks``), recomputed from our own vector. ef's
    value sent is then not held whole either: ``side`` holds a ``Sum`` of the proposal and
    ``state``'s residual owed, whose memory ``destinations`` gives up for our new residual."""
    lazy = not keep_own and _aligned(cfg.block_size)
    if cfg.mode == "noloco":
        delta = state.momentum if state.momentum is not None else torch.zeros_like(state.phi)
        parts = [fp32_part(theta, "theta")]
        own = {"theta": theta}
        if not cfg.theta_only:
            parts.append(fp32_part(state.phi, "phi"))
            own["phi"] = state.phi
        return Message(round, tuple(parts), own, momentum=delta)
    if lazy and in_place and _fusable(cfg, state, theta, round):
        return _prepare_in_place(cfg, state, theta, round)
    proposal, momentum = _nesterov(cfg, state, theta, in_place)
    if cfg.mode == "diloco":
        side: dict[str, Vector] = {}
        parts, own = [fp32_part(proposal, "proposal")], {"proposal": proposal}
        if cfg.bits != 32:
            parts, own, side = _siq_part(cfg, "proposal", proposal, state, cfg.bits, lazy)
        if cfg.share_momentum:
            if cfg.momentum_bits == 32:
                parts.append(fp32_part(momentum, "momentum"))
                own["momentum"] = momentum
            else:
                away = None
                if cfg.momentum_bits < 16:
                    away = _block_max(state.phi, cfg.block_size, minus=theta)
                enc, hat = _momentum_part(cfg, momentum, state, away, lazy)
                parts.append(enc)
                side["momentum"] = momentum
                if hat is not None:
                    own["momentum"] = hat
        return Message(round, tuple(parts), own, side, proposal, momentum)
    # ef
    owed = state.residual if (state.residual is not None and cfg.error_feedback) else None
    if cfg.design == "pull" and not cfg.is_pull_round(round):
        step = proposal - state.phi
        value = step if owed is None else step + owed
        codec = get_codec(cfg.codec, block_size=cfg.codec_block)
        enc = codec.encode(value, name="step")
        hat = codec.decode(enc)
        return Message(round, (enc,), {"step": hat}, {}, proposal, momentum, value)
    index = None if cfg.design == "pull" else _selected(cfg, proposal.numel(), round)
    if index is None:
        bits = 16 if cfg.design == "pull" else cfg.bits
        if lazy and owed is not None and owed.shape == proposal.shape == (proposal.numel(),):
            # Not held whole: the value sent is summed a slice at a time where it is read (its
            # bound, its encoding, both decodings and our new residual), the same bits.
            lazy_value = Sum(proposal, owed)
            parts, own, side = _siq_part(cfg, "proposal", lazy_value, state, bits, lazy)
            return Message(round, tuple(parts), own, side, proposal, momentum)
        value = proposal if owed is None else proposal + owed
        parts, own, side = _siq_part(cfg, "proposal", value, state, bits, lazy)
        return Message(round, tuple(parts), own, side, proposal, momentum, value)
    value = proposal if owed is None else proposal + owed
    view = OuterState(
        phi=state.phi[index],
        bound=None if state.bound is None else _block_values(state.bound, index, cfg.block_size),
    )
    name = _rotated("proposal", cfg, round)
    parts, own, side = _siq_part(cfg, name, value[index], view, cfg.bits)
    return Message(round, tuple(parts), own, side, proposal, momentum, value, index)


def _siq_part(
    cfg: RoundConfig,
    name: str,
    value: Vector,
    state: OuterState,
    bits: int,
    lazy: bool = False,
    steps: Tensor | None = None,
) -> tuple[list[Encoded], dict[str, Tensor], dict[str, Vector]]:
    """``value``'s side-information part, on the lattice of ``steps`` (None: from ``value``'s
    distance to ``state.phi``, ``_proposal_steps``)."""
    if steps is None:
        bound = 2 * _block_max(value, cfg.block_size, minus=state.phi)
        steps = _proposal_steps(cfg, bound, state, bits)
    if lazy:
        enc, _ = siq_encode(
            value, steps, bits=bits, block_size=cfg.block_size, name=name, keep_hat=False
        )
        return [enc], {}, {name: value}
    enc, hat = siq_encode(value, steps, bits=bits, block_size=cfg.block_size, name=name)
    return [enc], {name: hat}, {name: value}


def _proposal_steps(cfg: RoundConfig, bound: Tensor, state: OuterState, bits: int) -> Tensor:
    """The lattice of a proposal (or ef's value sent) from ``bound``, twice its distance to phi
    per block, and the distance seen at the last exchange (``state.bound``)."""
    if state.bound is not None and state.bound.shape == bound.shape:
        bound = torch.maximum(bound, state.bound)
    margin = cfg.effective_margin if bits == cfg.bits else 16.0
    return siq_steps(bound, bits, margin)


def _momentum_part(
    cfg: RoundConfig, momentum: Tensor, state: OuterState, away: Tensor | None, lazy: bool
) -> tuple[Encoded, Tensor | None]:
    """diloco's shared momentum at ``momentum_bits`` (side information), and our entry unless
    ``lazy``. ``away``: per block the largest ``|phi - theta|``, which bounds the lattice below
    16 bits."""
    # Momenta differ by this round's pseudo-gradients and what the last exchange saw; at 16 bits
    # the whole magnitude fits (margin 16 costs nothing).
    if cfg.momentum_bits >= 16:
        bound, margin = 2 * _block_max(momentum, cfg.block_size), 16.0
    else:
        if away is None:
            raise ValueError("a momentum below 16 bits needs |phi - theta|'s bound")
        bound = 2 * away
        if state.mbound is not None and state.mbound.shape == bound.shape:
            bound = torch.maximum(bound, state.mbound)
        margin = 4.0
    steps = siq_steps(bound, cfg.momentum_bits, margin)
    return siq_encode(
        momentum,
        steps,
        bits=cfg.momentum_bits,
        block_size=cfg.block_size,
        name="momentum",
        keep_hat=not lazy,
    )


def _fusable(cfg: RoundConfig, state: OuterState, theta: Tensor, round: int) -> bool:
    """Whether ``prepare`` can take its step in the old state's memory (``_prepare_in_place``):
    a siq proposal over every element, from a flat state (its momentum, if any, of phi's shape),
    and for ef a residual owed of the proposal's own shape (or none)."""
    phi, momentum = state.phi, state.momentum
    if phi.dim() != 1 or theta.shape != phi.shape or not phi.is_contiguous():
        return False
    if momentum is not None and not (momentum.is_contiguous() and momentum.shape == phi.shape):
        return False
    if cfg.mode == "diloco":
        return cfg.bits != 32 and not (cfg.share_momentum and cfg.momentum_bits == 32)
    if cfg.design == "pull" and not cfg.is_pull_round(round):
        return False
    if cfg.design != "pull" and _selected(cfg, phi.numel(), round) is not None:
        return False
    owed = state.residual if cfg.error_feedback else None
    return owed is None or owed.shape == phi.shape


def _prepare_in_place(cfg: RoundConfig, state: OuterState, theta: Tensor, round: int) -> Message:
    """``prepare(keep_own=False, in_place=True)`` of a siq proposal (``_fusable``), with the
    round's step written over the old state: the new momentum over the old momentum and the
    proposal over the old phi (the first round's momentum is a new tensor), so no model-sized
    temporary is made. The same message and the same bits as the allocating path.

    Two passes of the step, a chunk at a time: the first writes nothing (it measures the
    proposal's distance to phi per block, the lattice's bound, and checks that everything sent
    is finite, so a failure leaves the state as it was); the second measures how far our own
    entry moved from the old phi (``Message.moved``: ``own_step`` could not read it afterwards)
    and then writes the chunk. The parts are encoded from the state's new tensors."""
    phi, old = state.phi, state.momentum
    owed = state.residual if (cfg.mode == "ef" and cfg.error_feedback) else None
    bits = 16 if (cfg.mode == "ef" and cfg.design == "pull") else cfg.bits
    shared = cfg.mode == "diloco" and cfg.share_momentum
    away = shared and cfg.momentum_bits < 16  # the momentum's lattice is bounded by |phi - theta|
    n, block = phi.numel(), cfg.block_size
    blocks = (n + block - 1) // block
    bound = torch.empty(blocks, dtype=torch.float32)
    mbound = torch.empty(blocks, dtype=torch.float32) if away else None
    for i0, i1, b0, b1 in _step_chunks(n, block):
        apart, m, p = _step_chunk(cfg, phi, theta, old, i0, i1, away=away)
        value = p if owed is None else torch.add(p, owed[i0:i1])  # a Sum's slice
        if not bool(torch.isfinite(value).all()):
            raise ValueError("siq: tensor proposal holds NaN or Inf")
        if shared and not bool(torch.isfinite(m).all()):
            raise ValueError("siq: tensor momentum holds NaN or Inf")
        bound[b0:b1] = _blocks_max(value.sub_(phi[i0:i1]).abs_(), block)
        if mbound is not None and apart is not None:
            mbound[b0:b1] = _blocks_max(apart, block)
    steps = _proposal_steps(cfg, 2 * bound, state, bits)
    momentum = old if old is not None else torch.empty(n, dtype=phi.dtype)
    distance = Distance()
    for i0, i1, b0, b1 in _step_chunks(n, block):
        _, m, p = _step_chunk(cfg, phi, theta, old, i0, i1)
        value = p if owed is None else torch.add(p, owed[i0:i1])
        distance.add(phi[i0:i1], siq_hat(value, steps[b0:b1], block))
        momentum[i0:i1] = m
        phi[i0:i1] = p
    proposal = phi
    sent: Vector = proposal if owed is None else Sum(proposal, owed)
    parts, own, side = _siq_part(cfg, "proposal", sent, state, bits, True, steps)
    if shared:
        enc, _ = _momentum_part(cfg, momentum, state, mbound, True)
        parts.append(enc)
        side["momentum"] = momentum
    return Message(round, tuple(parts), own, side, proposal, momentum, moved=distance.value)


@dataclass(frozen=True, slots=True)
class Partner:
    """A partner's decoded message."""

    tensors: dict[str, Tensor]
    """By name: what the partner sent, where a side-information block failed its checksum
    replaced by our own entry (that block then averages to our own value)."""
    wrapped_blocks: int = 0
    """Side-information blocks whose checksum failed (our vector was out of the lattice's
    reach there)."""
    deferred: dict[str, Encoded] = field(default_factory=dict)
    """By name: side-information parts checked (every value decoded once) but not kept decoded
    (``read(defer=True)``); ``pair_means`` decodes them again, a chunk at a time, into the
    pair's mean."""
    distances: dict[str, float] = field(default_factory=dict)
    """By name, for the deferred parts: ``relative_distance(ours, theirs)``, what clipping
    judges, summed as they were checked."""


def read(
    cfg: RoundConfig,
    msg: Message,
    parts: Sequence[Encoded],
    *,
    limits: DecodeLimits = DEFAULT_LIMITS,
    defer: bool = False,
) -> Partner:
    """A partner's message for the same round, checked and decoded. ``defer``: side-information
    parts are checked and measured a chunk at a time and left encoded (``Partner.deferred``), so
    no decoded copy of them is held until ``pair_means`` forms the mean.

    Raises:
        CorruptPayload: Wrong tensor names or shapes, or a malformed part.
    """
    names = tuple(p.name for p in parts)
    if names != msg.names:
        raise CorruptPayload(
            "message", ",".join(names)[:80], f"holds {list(names)}, expected {list(msg.names)}"
        )
    out: dict[str, Tensor] = {}
    deferred: dict[str, Encoded] = {}
    distances: dict[str, float] = {}
    wrapped = 0
    for part in parts:
        ours_part = _part(msg, part.name)
        if part.shape != ours_part.shape:
            raise CorruptPayload(
                part.codec, part.name, f"shape {part.shape}, ours {ours_part.shape}"
            )
        lazy = part.name not in msg.own
        # A partner of our round settings uses our blocks (and another block size could pick
        # the decoder's chunk size: model-sized temporaries).
        if part.name in msg.side and part.codec != ours_part.codec:
            raise CorruptPayload(part.codec, part.name, f"expected codec {ours_part.codec!r}")
        if part.name in msg.side and part.block_size != ours_part.block_size:
            raise CorruptPayload(
                part.codec, part.name, f"block size {part.block_size}, ours {ours_part.block_size}"
            )
        if part.name in msg.side and (lazy or defer) and _chunked(part):
            distance = Distance()
            for _, _, theirs, mine, bad in _pair_chunks(part, msg, limits):
                wrapped += int(bad.sum())
                distance.add(mine, theirs)
            deferred[part.name] = part
            distances[part.name] = distance.value
            continue
        ours = msg.own[part.name]
        if part.name in msg.side:
            values, bad = siq_decode(part, msg.side[part.name], limits=limits)
            if bool(bad.any()):
                wrapped += int(bad.sum())
                mask = bad.repeat_interleave(part.block_size)[: values.numel()]
                values = torch.where(mask, ours, values, out=values)  # values is ours
            out[part.name] = values
        else:
            if part.codec == "siq":
                raise CorruptPayload(part.codec, part.name, "side-information part not expected")
            out[part.name] = decode(part, limits=limits)
    return Partner(out, wrapped, deferred, distances)


def _chunked(part: Encoded) -> bool:
    """Whether ``part``'s decoding chunks are ``relative_distance``'s (so a distance summed over
    them is the same bits)."""
    return 1 <= part.block_size <= DISTANCE_CHUNK and _aligned(part.block_size)


def _aligned(block_size: int) -> bool:
    return DISTANCE_CHUNK % math.lcm(block_size, 8) == 0


def _part(msg: Message, name: str) -> Encoded:
    return next(p for p in msg.parts if p.name == name)


def own_chunks(msg: Message, name: str) -> Iterator[tuple[int, int, Tensor]]:
    """Our own entry of ``name`` (what partners reconstruct of it), ``DISTANCE_CHUNK`` elements
    at a time: slices of ``msg.own[name]``, or where the message does not keep it
    (``prepare(keep_own=False)``) recomputed from our own vector and our own part's steps, the
    same bits as the entry ``siq_encode`` returns (each chunk is a reused buffer: read it before
    taking the next)."""
    if name in msg.own:
        flat = msg.own[name].reshape(-1)
        for i0 in range(0, flat.numel(), DISTANCE_CHUNK):
            i1 = min(flat.numel(), i0 + DISTANCE_CHUNK)
            yield i0, i1, flat[i0:i1]
        return
    yield from siq_hat_chunks(_part(msg, name), msg.side[name], chunk=DISTANCE_CHUNK)


def own_step(msg: Message, phi: Tensor | None) -> float | None:
    """``robust.own_step`` of our message (how far its weights moved from ``phi``, the outer
    weights it was prepared from, relative), with our own entry read a chunk at a time; the
    distance measured at prepare where the message was made in the old phi's memory."""
    if phi is None:
        return None
    if msg.moved is not None:
        return msg.moved
    for name in ("theta", "proposal"):
        if name in msg.names and _part(msg, name).shape == tuple(phi.shape):
            # Our entry's chunks are relative_distance's: the same sums, kept or not.
            total, flat = Distance(), phi.reshape(-1)
            for i0, i1, mine in own_chunks(msg, name):
                total.add(flat[i0:i1], mine)
            return total.value
    return None


def _pair_chunks(
    part: Encoded, msg: Message, limits: DecodeLimits
) -> Iterator[tuple[int, int, Tensor, Tensor, Tensor]]:
    """A partner's side-information part decoded a chunk at a time against our vector, beside
    our own entry's chunk, each chunk's blocks that failed their checksum replaced by our own
    entry: (start, end, theirs, ours, failed blocks); both chunks are reused buffers or views."""
    theirs = siq_decode_chunks(part, msg.side[part.name], limits=limits, chunk=DISTANCE_CHUNK)
    for (i0, i1, _, _, values, bad), (_, _, mine) in zip(
        theirs, own_chunks(msg, part.name), strict=True
    ):
        if bool(bad.any()):
            mask = bad.repeat_interleave(part.block_size)[: i1 - i0]
            torch.where(mask, mine, values, out=values)
        yield i0, i1, values, mine, bad


def destinations(cfg: RoundConfig, msg: Message) -> dict[str, Tensor]:
    """Round temporaries that a pair's mean may be formed in (``pair_means``' ``into``), by
    message tensor: our solo result (proposal and momentum), which the round's result replaces;
    each is read, a chunk at a time, before the mean is written there. Only where ``combine``
    reads nothing else of it afterwards: not for a rotated ef round (it keeps our own step
    outside the covered blocks) nor where the proposal is the value ef sent (its residual is
    computed from it). For ef with a value not held whole (``Sum``), also ``"residual"``: the
    residual owed, which our new residual replaces (each chunk of the value is read before it is
    written). The caller gives them up only while no reader holds the state."""
    out: dict[str, Tensor] = {}
    if cfg.mode == "noloco" or msg.index is not None:
        return out
    value = msg.side.get("proposal")
    if cfg.mode == "ef" and cfg.error_feedback and isinstance(value, Sum):
        owed = value.b
        if owed.is_contiguous() and not any(_shares_memory(owed, t) for t in msg.own.values()):
            out["residual"] = owed
    for name, t in (("proposal", msg.proposal), ("momentum", msg.momentum)):
        if name not in msg.side or t is None or not t.is_contiguous() or t.dtype != torch.float32:
            continue
        if cfg.mode == "ef" and (
            name != "proposal" or (msg.sent is not None and _shares_memory(msg.sent, t))
        ):
            continue
        if any(_shares_memory(t, own) for own in msg.own.values()):
            continue
        out[name] = t
    return out


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@dataclass(frozen=True, slots=True)
class Against:
    """What ``pair_means`` measured of a deferred tensor's mean against our own entry, for
    ``combine`` and ``disagreement`` where the message does not keep our entry."""

    distance: float | None
    """``relative_distance(ours, mean)``; None where nobody reads it (only the message's first
    tensor's is read, by ``disagreement``)."""
    block_max: Tensor | None
    """``_block_max(mean, block_size, minus=ours)``; None where ``combine`` does not read it
    (diloco's proposal)."""
    residual: Tensor | None = None
    """ef: ``sent - ours`` (our new residual), where ``combine`` would compute it."""


def pair_means(
    cfg: RoundConfig,
    state: OuterState,
    msg: Message,
    partner: Partner,
    shares: tuple[float, float] | None = None,
    weights: Mapping[str, float] | None = None,
    *,
    into: Mapping[str, Tensor] | None = None,
    reuse_message: bool = False,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> tuple[dict[str, Tensor], dict[str, Against]]:
    """The pair's mean of every message tensor, ours and the partner's clipped toward ours
    (``weights``: ``torch.lerp``'s weight of each clipped tensor, ``Clip.weight``), the same bits
    as ``pair_mean_into(msg.own, clipped)``. Decoded tensors are used up (the mean is computed in
    them); a deferred part is decoded again a chunk at a time and its mean written, a whole chunk
    at once, into ``into``'s tensor of that name (given up by the caller, ``destinations``) or a
    new one; with it, what ``combine`` and ``disagreement`` read of our own entry (``Against``),
    and for ef our new residual (in ``into``'s ``"residual"``, else in ``msg.sent`` with
    ``reuse_message``, as ``combine``)."""
    weights = weights or {}
    means: dict[str, Tensor] = {}
    against: dict[str, Against] = {}
    for name in msg.names:
        weight = weights.get(name, 1.0)
        if name in partner.tensors:
            t = partner.tensors[name]
            if weight != 1.0:
                t = lerp_into(msg.own[name], t, weight)
            means.update(pair_mean_into(msg.own, {name: t}, shares))
            continue
        part = partner.deferred[name]
        n, block = part.shape[0], part.block_size
        dest = (into or {}).get(name)
        if dest is None:
            dest = torch.empty(n, dtype=torch.float32)
        out = dest.view(-1)
        residual, sent = None, msg.side[name]
        # Where the message keeps our entry, ``combine`` computes the residual from it.
        if cfg.mode == "ef" and cfg.error_feedback and name not in msg.own:
            residual = (into or {}).get("residual")
            # Else in the value sent where it is held whole, but not in the proposal's memory
            # (ef's pull rounds with nothing owed send it as it is): it is our solo result's phi
            # until the round's result is in.
            if residual is None and (
                reuse_message
                and isinstance(sent, Tensor)
                and _private(sent, msg, state)
                and (msg.proposal is None or not _shares_memory(sent, msg.proposal))
            ):
                residual = sent
            if residual is None:
                residual = torch.empty(n, dtype=torch.float32)
        # Only what combine and disagreement read: the first tensor's distance, the bound of
        # ef's proposal and of diloco's momentum.
        distance = Distance() if name == msg.names[0] else None
        block_max = None
        if cfg.mode == "ef" or name == "momentum":
            block_max = torch.empty((n + block - 1) // block, dtype=torch.float32)
        for i0, i1, theirs, mine, _ in _pair_chunks(part, msg, limits):
            if weight != 1.0:
                torch.lerp(mine, theirs, weight, out=theirs)
            if shares is None:
                mean = theirs.add_(mine).div_(2)
            else:
                mean = theirs.mul_(shares[1]).add_(mine * shares[0])
            if distance is not None:
                distance.add(mine, mean)
            if block_max is not None:
                block_max[i0 // block : (i1 + block - 1) // block] = _block_max(mean, block, mine)
            if residual is not None:
                torch.sub(sent[i0:i1], mine, out=residual[i0:i1])
            out[i0:i1] = mean  # a whole chunk of the mean at once, after its side was read
        means[name] = dest
        against[name] = Against(None if distance is None else distance.value, block_max, residual)
    return means, against


def member_shares(weights: Sequence[float], max_ratio: float) -> list[float] | None:
    """Each member's share of the group's mean from its weight (the tokens it trained in the
    round), or None when the members count equally (the plain mean, bit for bit as before
    weights existed). A weight of 0 (not given) or below makes every member count equally. No
    member weighs more than ``max_ratio`` times the lightest (a peer's claim is untrusted).
    Every member computes the same shares from the same weights, in any order."""
    if len(weights) < 2 or min(weights) <= 0:
        return None
    low = min(weights)
    capped = [min(float(w), max_ratio * low) for w in weights]
    if all(w == capped[0] for w in capped):
        return None
    total = sum(capped)
    return [w / total for w in capped]


def spread_of(shares: Sequence[float] | None, me: int) -> float:
    """How much farther the other member of a pair lies from us than the pair's mean does:
    2 for an equal pair, ``1 / their share`` for a weighted one (``combine``'s ``spread``, and
    ``disagreement``'s). Groups of more than two keep 2 (the same scale, not exact)."""
    if shares is None or len(shares) != 2:
        return 2.0
    return 1.0 / shares[1 - me]


_MEAN_CHUNK = 1 << 20
"""Elements per chunk of a weighted pair mean (its one temporary)."""


def pair_mean_into(
    own: Mapping[str, Tensor],
    theirs: dict[str, Tensor],
    shares: tuple[float, float] | None = None,
) -> dict[str, Tensor]:
    """``member_mean([own, theirs], shares)``, bit for bit, computed in ``theirs``'s tensors
    (which the caller gives up: a decoded partner message): no new model-sized tensor. Two
    addends sum to the same bits in either order, and the division is the same. ``shares``:
    (ours, theirs) from ``member_shares``, or None for the plain mean."""
    for name, t in theirs.items():
        if shares is None:
            t.add_(own[name]).div_(2)
            continue
        mine, flat = own[name].reshape(-1), t.view(-1)
        for i in range(0, flat.numel(), _MEAN_CHUNK):
            part = flat[i : i + _MEAN_CHUNK]
            part.mul_(shares[1]).add_(mine[i : i + _MEAN_CHUNK] * shares[0])
    return theirs


def member_mean(
    members: Sequence[Mapping[str, Tensor]], shares: Sequence[float] | None = None
) -> dict[str, Tensor]:
    """The group's mean of every named tensor, summed in the members' given order (every member
    passes the same order and gets the same bits); weighted by ``shares`` (``member_shares``)
    when given."""
    if not members:
        raise ValueError("member_mean needs at least one member")
    if shares is None:
        return {name: group_mean([m[name] for m in members]) for name in members[0]}
    return {name: weighted_mean([m[name] for m in members], shares) for name in members[0]}


def weighted_mean(tensors: Sequence[Tensor], shares: Sequence[float]) -> Tensor:
    """``sum_i shares[i] * tensors[i]``, each product rounded, summed in the given order (for
    two members the same bits in either order)."""
    if len(tensors) != len(shares) or not tensors:
        raise ValueError(f"weighted_mean: {len(tensors)} tensors, {len(shares)} shares")
    total = tensors[0] * shares[0]
    for t, share in zip(tensors[1:], shares[1:], strict=True):
        total.add_(t * share)
    return total


def combine(
    cfg: RoundConfig,
    state: OuterState,
    msg: Message,
    means: Mapping[str, Tensor],
    *,
    reuse_means: bool = False,
    reuse_message: bool = False,
    reuse_state: bool = False,
    spread: float = 2.0,
    against: Mapping[str, Against] | None = None,
) -> OuterState:
    """Our new state from the group's means of every member's ``own`` (ours included).
    ``spread`` (``spread_of``) turns our distance to the mean into the distance to the others,
    which sizes the next side-information lattice.

    Writes into none of its inputs, except where the caller gives them up:

    - ``reuse_means``: the means' tensors are the caller's (a partner's decoded message that
      holds the pair's mean) and nobody reads them afterwards, ``disagreement`` included:
      noloco computes its new delta in them.
    - ``reuse_message``: ``msg`` is finished with this call (neither combined again nor used
      ``alone``): ef computes its new residual in the message's own round temporaries
      (``proposal`` / ``sent``, never ``own``, ``state`` or theta).
    - ``reuse_state``: nobody reads ``state``'s momentum after this call (the caller swaps in
      the result and holds off the state's other readers): noloco computes its new phi in the
      old delta's memory.

    ``against``: from ``pair_means``, what it measured against our own entries that the
    message does not keep (``prepare(keep_own=False)``).
    """
    against = against or {}
    if cfg.mode == "noloco":
        gamma = cfg.lr if cfg.gamma is None else cfg.gamma
        assert msg.momentum is not None  # prepare() sets it for every mode
        phi, delta = noloco_step_from_means(
            state.phi,
            msg.momentum,
            means["theta"],
            means.get("phi"),
            alpha=cfg.momentum,
            beta=cfg.lr,
            gamma=gamma,
            reuse=reuse_means,
            # The delta is the state's momentum (or zeros made for this message).
            reuse_delta=reuse_state and _private(msg.momentum, msg, state, own_momentum=False),
        )
        return replace(state, phi=phi, momentum=delta)
    if cfg.mode == "diloco":
        if not cfg.share_momentum:
            return replace(state, phi=means["proposal"], momentum=msg.momentum)
        if "momentum" in msg.own:
            block_max = _block_max(means["momentum"], cfg.block_size, minus=msg.own["momentum"])
        else:
            block_max = _bound_of(against, "momentum")
        seen = spread * block_max
        return replace(state, phi=means["proposal"], momentum=means["momentum"], mbound=seen)
    # ef
    assert msg.proposal is not None
    if "step" in means:
        assert msg.sent is not None  # the step's value is always held whole
        residual = None
        if cfg.error_feedback:
            if reuse_message and _private(msg.sent, msg, state):
                residual = msg.sent.sub_(msg.own["step"])  # the same bits as sent - own
            else:
                residual = msg.sent - msg.own["step"]
        step = means["step"]
        phi = step.add_(state.phi) if reuse_means else state.phi + step  # a sum either way round
        return replace(state, phi=phi, momentum=msg.momentum, residual=residual)
    name = msg.names[0]
    mean = means[name]
    if name not in msg.own:  # not kept: pair_means measured it (never a rotated round)
        return OuterState(
            phi=mean,
            momentum=msg.momentum,
            residual=against[name].residual,
            bound=spread * _bound_of(against, name),
        )
    own = msg.own[name]
    assert msg.sent is not None  # held whole wherever our entry is kept
    # The largest distance to the group's other members, from the mean (exact for pairs).
    seen = spread * _block_max(mean, cfg.block_size, minus=own)
    if msg.index is None:
        residual = None
        if cfg.error_feedback:
            if reuse_message and _private(msg.sent, msg, state):
                residual = msg.sent.sub_(own)  # the same bits as msg.sent - own
            else:
                residual = msg.sent - own
        return OuterState(phi=mean, momentum=msg.momentum, residual=residual, bound=seen)
    # Rotated: the covered blocks average; the others take our own step and keep what they owe.
    phi = msg.proposal.clone()
    phi[msg.index] = mean
    residual = None
    if cfg.error_feedback:
        residual = msg.sent - msg.proposal
        residual[msg.index] = msg.sent[msg.index] - own
    bound = state.bound
    if bound is None:
        bound = torch.zeros((msg.proposal.numel() + cfg.block_size - 1) // cfg.block_size)
    bound = bound.clone()
    bound[msg.index[:: cfg.block_size] // cfg.block_size] = seen
    return OuterState(phi=phi, momentum=msg.momentum, residual=residual, bound=bound)


def _bound_of(against: Mapping[str, Against], name: str) -> Tensor:
    """The lattice bound ``pair_means`` measured for ``name`` (our entry not kept)."""
    bound = against[name].block_max if name in against else None
    if bound is None:
        raise ValueError(f"combine: no bound of {name!r} was measured (pass pair_means' against)")
    return bound


def disagreement(
    msg: Message,
    means: Mapping[str, Tensor],
    spread: float = 2.0,
    against: Mapping[str, Against] | None = None,
) -> float | None:
    """How far apart the group's outer weights were, from what the exchange carried: the
    relative RMS distance ``|theirs - ours| / |ours|`` of the weights the message holds (phi for
    noloco when it is sent, else theta; the proposal for diloco and ef, on the blocks a rotated
    round covers). From the group's mean as ``2 |mean - ours| / |ours|``, exact for a pair and
    the same scale for larger groups (``spread``: 1 / the others' share of a weighted pair's
    mean). None for messages that carry no weights (ef's pull design between pulls sends
    steps)."""
    name = "phi" if "phi" in msg.own else msg.names[0]
    if name == "step" or name not in means:
        return None
    measured = None if against is None or name not in against else against[name].distance
    if name not in msg.own:  # not kept: ``pair_means`` measured it (``against``)
        if measured is None:
            raise ValueError(f"disagreement: no distance of {name!r} was measured")
        distance = measured
    else:
        # In float64, a chunk at a time: no model-sized temporary (a whole one was alive at
        # ef's peak).
        distance = relative_distance(msg.own[name], means[name])
    return None if math.isnan(distance) else spread * distance


def _private(t: Tensor, msg: Message, state: OuterState, *, own_momentum: bool = True) -> bool:
    """Whether ``t`` is one of ``msg``'s round temporaries that no reader of the round's result
    holds: it shares no memory with ``msg.own``, ``msg.momentum`` or ``state`` (with
    ``own_momentum`` False: the state's momentum and ``msg.momentum`` may be ``t`` itself)."""
    if not t.is_contiguous():
        return False
    others = [*msg.own.values(), state.phi]
    if own_momentum:
        others += [v for k, v in state.tensors().items() if k != "phi"]
        if msg.momentum is not None:
            others.append(msg.momentum)
    else:
        others += [v for k, v in state.tensors().items() if k not in ("phi", "momentum")]
    return all(t.untyped_storage().data_ptr() != o.untyped_storage().data_ptr() for o in others)


def alone(cfg: RoundConfig, state: OuterState, msg: Message) -> OuterState:
    """Our new state when the round had no partner or its exchange failed: our own step; an ef
    residual keeps everything still owed."""
    if cfg.mode == "noloco":
        return combine(cfg, state, msg, msg.own)  # msg.own is theta: never reused
    assert msg.proposal is not None  # prepare() sets it for diloco and ef
    return replace(state, phi=msg.proposal, momentum=msg.momentum)
