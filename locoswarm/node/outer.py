"""The node's outer step: the daemon's driver of ``sync/rounds.py`` (the simulator is the other).

``prepare`` turns this round's theta into the round's message and its wire form (diloco and ef
swap in the round's solo result there); ``decode`` reads a partner's message (side-information
parts are decoded against our own); ``apply`` / ``apply_mean`` / ``solo`` finish the round and
swap in the new outer state as one value. The maths
lives in ``sync/rounds.py``; this module only wires it to the wire format of ``protocol/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, overload

import torch
from torch import Tensor

from locoswarm.compression.codecs import decode, get_codec
from locoswarm.compression.encoded import DecodeLimits, Encoded, all_finite
from locoswarm.errors import ProtocolViolation
from locoswarm.node.config import NodeConfig
from locoswarm.protocol import Header, Outgoing, Received, TensorSpec
from locoswarm.sync import rounds
from locoswarm.sync.robust import Clip, Clipper, relative_distance
from locoswarm.sync.round_config import RoundConfig
from locoswarm.sync.rounds import Message, OuterState

log = logging.getLogger("locoswarm.node")

STATE_NAMES = ("phi", "momentum")


@dataclass
class Prepared:
    """One round's message and its wire form."""

    outer_step: int
    theta: Tensor
    outgoing: Outgoing
    message: Message
    state: OuterState
    """What finishing the round combines with: the outer state it started from, without the
    old phi where nothing after ``prepare`` reads it (diloco, ef's siq design: its place is
    taken by our proposal, so the old phi is freed while the exchange runs)."""
    step: float | None = None
    """How far our message's weights moved from the old phi (``robust.own_step``): it bounds
    a partner's clipping threshold until the swarm's median is known."""


def fingerprint(config: NodeConfig, shapes: list[tuple[int, ...]]) -> str:
    """Nodes exchange only with nodes whose fingerprint matches: same task, model shapes,
    initial-weight seed, and the same round maths and message layout."""
    rc = config.sync.round_config
    text = "|".join(
        (config.task.name, str(shapes), str(config.trainer.seed), repr(dataclasses.astuple(rc)))
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _spec(encoded: Encoded, name: str) -> TensorSpec:
    return TensorSpec(
        name=name,
        codec=encoded.codec,
        dtype=encoded.dtype,
        shape=encoded.shape,
        num_bytes=encoded.num_bytes,
        block_size=encoded.block_size,
        k_per_chunk=encoded.k_per_chunk,
    )


def _parts(received: Received) -> list[Encoded]:
    """The Encoded tensors of a message: views into its payload, by the header's specs (the
    payload is not copied)."""
    out, offset = [], 0
    view = memoryview(received.payload)
    for spec in received.header.tensors:
        out.append(
            Encoded(
                codec=spec.codec,
                shape=spec.shape,
                dtype=spec.dtype,
                payload=view[offset : offset + spec.num_bytes],
                block_size=spec.block_size,
                k_per_chunk=spec.k_per_chunk,
                name=spec.name,
            )
        )
        offset += spec.num_bytes
    return out


class _Lease:
    """A reader's hold on the outer state's memory (a checkpoint being written, a FetchState
    payload being sent)."""


class OuterStep:
    """The node's outer state and its side of each round.

    A round may work in the old state's memory only while nobody else reads the state: diloco
    and ef compute the new momentum over the old one when they prepare (they swap in the
    round's solo result at once, so a reader never sees half a state, and the old phi is
    freed), noloco writes its new phi over the old delta when it finishes, and an ef pair its new
    residual over the residual owed (``rounds.destinations``). FetchState payloads
    (views of the state's tensors, sent while the round goes on) and checkpoints hold a lease
    until they are done, and a round that finds one allocates instead (the same bits either
    way; a round that fails while it writes drops the momentum rather than keep half of it).
    ``_lock`` orders the leases against the one round that writes.
    """

    def __init__(
        self, config: NodeConfig, phi: Tensor, *, peer_id: str, fp: str, copy: bool = True
    ) -> None:
        """``copy`` False: ``phi`` is ours (a fresh flat copy of the model's weights), kept as
        it is instead of copied once more."""
        self.config = config
        self.mode = config.sync.mode
        self.rc: RoundConfig = config.sync.round_config
        self.peer_id = peer_id
        self.fingerprint = fp
        self._snapshot: tuple[int, OuterState] = (0, OuterState(phi=phi.clone() if copy else phi))
        self.numel = phi.numel()
        self.limits = DecodeLimits(max_numel=self.numel)
        self._fp32 = get_codec("fp32")
        self._current: Message | None = None
        self.wrapped_blocks = 0
        """Side-information blocks of partners' messages that failed their checksum (so far)."""
        self.heard: dict[str, int] = {}
        """This round: the round label of each sender whose message we decoded (round log)."""
        self.clipper = Clipper(self.rc)
        """Clips a pair partner's message toward ours before the mean (``sync/robust.py``)."""
        self.tokens = 0
        """Tokens this node trains in a round (every local rank), sent in each header: groups
        weight their members by it (0: not given, the members count equally)."""
        self.tokens_of: dict[str, int] = {}
        """This round: the tokens each sender we decoded said it trained."""
        self._lock = threading.Lock()
        self._leases: set[_Lease] = set()
        """Readers of the state's memory: a FetchState payload's views (each lease leaves when
        the array its view was cut from is freed, after the last view of it), a checkpoint."""
        self.in_place = 0
        """Rounds that worked in the old state's memory (tests)."""
        self.in_place_means = 0
        """Pair rounds whose mean was decoded into our solo result's memory (tests)."""

    @property
    def snapshot(self) -> tuple[int, OuterState]:
        """(the next round, the outer state after the rounds before it), swapped as one value:
        a reader on any thread sees one round's state, never a mix of two."""
        return self._snapshot

    @property
    def state(self) -> OuterState:
        return self._snapshot[1]

    @property
    def next_round(self) -> int:
        return self._snapshot[0]

    def restore(self, next_round: int, state: OuterState) -> None:
        """Replace the outer state (a checkpoint, a fetched state)."""
        with self._lock:
            self._snapshot = (next_round, state)

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Hold the state's memory unchanged (a checkpoint): rounds finishing meanwhile write
        their results into new tensors."""
        lease = _Lease()
        with self._lock:
            self._leases.add(lease)
        try:
            yield
        finally:
            with self._lock:
                self._leases.discard(lease)

    @property
    def phi(self) -> Tensor:
        return self.state.phi

    @property
    def momentum(self) -> Tensor | None:
        return self.state.momentum

    def header(
        self,
        outer_step: int,
        tensors: tuple[TensorSpec, ...],
        kind: str,
        members: tuple[str, ...] = (),
    ) -> Header:
        return Header(
            run_id=self.config.run_id,
            outer_step=outer_step,
            strategy=self.mode,
            sender_id=self.peer_id,
            model_fingerprint=self.fingerprint,
            tensors=tensors,
            kind=kind,
            members=members,
            tokens=self.tokens,
        )

    def control(self, outer_step: int, kind: str, members: tuple[str, ...] = ()) -> Outgoing:
        """A message without tensors (group join and roster)."""
        return Outgoing(self.header(outer_step, (), kind, members), b"")

    def shard_message(
        self, outer_step: int, kind: str, shard: Tensor, members: tuple[str, ...]
    ) -> Outgoing:
        """One fp32 shard for a group's reduce-scatter or all-gather."""
        encoded = self._fp32.encode(shard.contiguous(), name="shard")
        return Outgoing(
            self.header(outer_step, (_spec(encoded, "shard"),), kind, members), encoded.payload
        )

    def decode_shard(self, received: Received, length: int) -> Tensor:
        """A group member's shard, checked to be ``length`` fp32 values."""
        specs = received.header.tensors
        peer = received.header.sender_id
        if len(specs) != 1 or specs[0].name != "shard" or specs[0].shape != (length,):
            raise ProtocolViolation(
                peer, f"expected one shard of {length} values", reason="rejected"
            )
        shard = decode(_parts(received)[0], limits=self.limits)
        self.heard[peer] = received.header.outer_step  # the member's own round label
        self.tokens_of[peer] = received.header.tokens
        return shard

    # -- one round ------------------------------------------------------------------------------

    def prepare(self, outer_step: int, theta: Tensor, bad: Tensor | None = None) -> Prepared:
        """This round's message (CPU work: call it from a worker thread). diloco and ef swap in
        the round's solo result at once (readers see it, labelled as the round's end, until the
        round finishes) and work in the old momentum's memory when nobody reads the state (a
        pair's siq round in the old phi's as well: its proposal is sent encoded, never as a
        view, so no message of an earlier round reads phi's memory).
        ``bad`` (test seam, a bad peer): send the message of these weights instead of ours, made
        from the same start state; our own round goes on with our honest message."""
        with self._lock:
            start = self.state
            sent_as_view = self.rc.share_momentum and self.rc.momentum_bits == 32
            in_place = (
                self.mode != "noloco"
                and not sent_as_view  # a solo round's momentum may still be on the wire
                and not self._leases
                and all_finite(theta)  # a theta that fails the message's checks leaves no trace
            )
            sent = None if bad is None else rounds.prepare(self.rc, start, bad, round=outer_step)
            pair = self.config.sync.group_size <= 2  # groups average by reduce-scatter
            try:
                # A pair's round reads our own entries a chunk at a time (``apply``): not kept.
                message = rounds.prepare(
                    self.rc, start, theta, round=outer_step, in_place=in_place, keep_own=not pair
                )
            except BaseException:
                # The old momentum may be half overwritten. (A pair's siq round writes its step
                # over phi too, after checking everything it sends: only a failure after that,
                # such as no memory left for the encoded message, leaves part or all of our own
                # step in phi; the momentum starts afresh either way.)
                if in_place:
                    self._drop_momentum(outer_step, "prepare")
                raise
            if self.mode != "noloco":  # our solo result costs nothing: the message's tensors
                self._snapshot = (outer_step + 1, rounds.alone(self.rc, start, message))
            self.in_place += in_place
        # Groups are not clipped.
        step = rounds.own_step(message, start.phi) if self.rc.clip and pair else None
        finish = start
        if message.proposal is not None and not (self.mode == "ef" and self.rc.design == "pull"):
            finish = dataclasses.replace(start, phi=message.proposal)  # the old phi is not read
        outgoing = self._outgoing(outer_step, message if sent is None else sent)
        self._current = message
        self.heard = {}
        self.tokens_of = {}
        return Prepared(outer_step, theta, outgoing, message, finish, step)

    def _outgoing(self, outer_step: int, message: Message) -> Outgoing:
        specs = tuple(_spec(e, e.name) for e in message.parts)
        payload = tuple(e.payload for e in message.parts)  # sent back to back, never joined
        return Outgoing(self.header(outer_step, specs, "outer"), payload)

    @overload
    def decode(self, received: Received, names: None = None) -> rounds.Partner: ...

    @overload
    def decode(self, received: Received, names: tuple[str, ...]) -> list[Tensor]: ...

    def decode(
        self, received: Received, names: tuple[str, ...] | None = None
    ) -> rounds.Partner | list[Tensor]:
        """A partner's message for our open round (``names`` None), or a state message, checked
        and decoded; raises ``ProtocolViolation`` (CorruptPayload) naming what was wrong. A
        partner's side-information parts are checked (every value decoded once, and its distance
        from ours measured) and left encoded in the received payload: ``apply`` decodes them
        again into the pair's mean, so no decoded copy of them is held meanwhile."""
        peer = received.header.sender_id
        parts = _parts(received)
        if names is not None:
            if tuple(p.name for p in parts) != names:
                raise ProtocolViolation(
                    peer,
                    f"message holds {[p.name for p in parts]}, expected {list(names)}",
                    reason="rejected",
                )
            for part in parts:
                if part.shape != (self.numel,):
                    raise ProtocolViolation(
                        peer, f"tensor {part.name} has shape {part.shape}", reason="rejected"
                    )
            return [decode(p, limits=self.limits) for p in parts]
        current = self._current  # read once: the round may close on another thread meanwhile
        if current is None:
            raise ProtocolViolation(peer, "no round is open", reason="rejected")
        partner = rounds.read(self.rc, current, parts, limits=self.limits, defer=True)
        self.wrapped_blocks += partner.wrapped_blocks
        self.heard[peer] = received.header.outer_step
        self.tokens_of[peer] = received.header.tokens
        return partner

    def phi_after(self, round: int, theta: Tensor) -> Tensor:
        """What the trainer gets when round ``round`` ended without an outcome (an error of
        ours, a stop): the outer weights when the state already holds the round's step (diloco
        and ef swap in their solo result at prepare), else ``theta`` (no change: the next
        round's pseudo-gradient carries this one's). Either way the step counts once."""
        with self._lock:
            return self.state.phi if self.next_round > round else theta

    def _drop_momentum(self, round: int, what: str) -> None:
        """After a failure while the old momentum was being overwritten (the lock is held):
        the momentum starts afresh rather than keep half of it."""
        log.warning("round %d: %s failed; the momentum starts afresh", round, what)
        self._snapshot = (self.next_round, dataclasses.replace(self.state, momentum=None))

    def _commit(self, prepared: Prepared, new: OuterState) -> Tensor:
        self._snapshot = (prepared.outer_step + 1, new)  # one assignment: readers see either
        self._current = None
        return new.phi

    def shares(self, members: list[str]) -> list[float] | None:
        """Each member's share of this round's group mean (in ``members``' order), weighted by
        the tokens each trained (``rounds.member_shares``); None: equal shares."""
        weights = [
            self.tokens if peer == self.peer_id else self.tokens_of.get(peer, 0) for peer in members
        ]
        return rounds.member_shares(weights, self.rc.max_weight_ratio)

    def apply(
        self, prepared: Prepared, partner: rounds.Partner, partner_id: str = ""
    ) -> tuple[Tensor, float | None, list[Clip]]:
        """Finish the round with one partner's checked message (``decode``), clipped toward ours
        first; returns the new phi, how far apart we were (``rounds.disagreement``, after
        clipping) and each tensor's clipping. The mean weights us and the partner by the tokens
        each trained."""
        msg = prepared.message
        weights: dict[str, float] = {}
        clips: list[Clip] = []
        for name in msg.names:
            if name in partner.tensors:
                d = relative_distance(msg.own[name], partner.tensors[name])
            else:
                d = partner.distances[name]
            clip = self.clipper.judge(name, d, prepared.step)
            clips.append(clip)
            if clip.clipped:
                weights[name] = clip.weight
        shares = self.shares([self.peer_id, partner_id])
        pair = None if shares is None else (shares[0], shares[1])
        spread = rounds.spread_of(shares, 0)
        with self._lock:  # no new reader until the new state is in
            # Unread: nobody holds the state (nor the solo result swapped in at prepare, whose
            # tensors are the message's and, for ef, the residual owed).
            unread = not self._leases
            # The decoded message is ours to reuse: the means are computed in it (a clipped
            # tensor first in its own memory); a deferred part is decoded into its mean, in our
            # solo result's memory when nobody reads it.
            into = rounds.destinations(self.rc, msg) if unread else {}
            try:
                means, against = rounds.pair_means(
                    self.rc,
                    prepared.state,
                    msg,
                    partner,
                    pair,
                    weights,
                    into=into,
                    reuse_message=unread,
                    limits=self.limits,
                )
            except BaseException:
                if into:
                    # Our solo result holds the pair's mean (and ef's new residual) in the chunks
                    # written so far and our own step in the others (each written whole): a
                    # state, if a mixed one.
                    log.warning(
                        "round %d: the pair's mean failed part way; keeping what was written",
                        msg.round,
                    )
                raise
            # Once the disagreement is read from the means, noloco's new delta is computed in
            # them.
            distance = rounds.disagreement(msg, means, spread, against)
            try:
                new = rounds.combine(
                    self.rc,
                    prepared.state,
                    msg,
                    means,
                    reuse_means=True,
                    reuse_message=unread,
                    reuse_state=unread,
                    spread=spread,
                    against=against,
                )
            except BaseException:
                if unread and self.mode == "noloco":  # the old delta may be half overwritten
                    self._drop_momentum(msg.round, "the update")
                raise
            self.in_place += unread and self.mode == "noloco"
            self.in_place_means += bool(into)
            return self._commit(prepared, new), distance, clips

    def group_vector(self, prepared: Prepared) -> Tensor:
        """Our entry of a group's mean, flat (every named tensor, in message order)."""
        msg = prepared.message
        return torch.cat([msg.own[name] for name in msg.names])

    def apply_mean(
        self, prepared: Prepared, mean: Tensor, partners: tuple[str, ...] = ()
    ) -> tuple[Tensor, float | None]:
        """Finish the round with the group's mean of ``group_vector``; returns the new phi and
        how far apart we were."""
        msg = prepared.message
        means = dict(zip(msg.names, torch.split(mean, self.numel), strict=True))
        spread = rounds.spread_of(self.shares([self.peer_id, *partners]), 0)
        distance = rounds.disagreement(msg, means, spread)
        with self._lock:
            new = rounds.combine(
                self.rc,
                prepared.state,
                msg,
                means,
                reuse_message=not self._leases,
                spread=spread,
            )
            return self._commit(prepared, new), distance

    def solo(self, prepared: Prepared) -> Tensor:
        """Finish the round alone (no partner, or the exchange failed); returns the new phi."""
        with self._lock:
            return self._commit(prepared, rounds.alone(self.rc, prepared.state, prepared.message))

    # -- state for checkpoints and late joiners -------------------------------------------------

    def state_payload(self) -> Outgoing:
        """phi and momentum of one round as an fp32 payload (FetchState), labelled with the
        round that follows them. Whole-model work: call it from a worker thread."""
        with self._lock:
            next_round, state = self._snapshot
            momentum = state.momentum if state.momentum is not None else torch.zeros_like(state.phi)
            # Views of the state's tensors, sent back to back: no copy. Each view holds the
            # array it was cut from, our lease: no round writes over this state until every
            # view is gone (the payload sent or dropped).
            parts = [rounds.fp32_part(state.phi, "phi"), rounds.fp32_part(momentum, "momentum")]
            for part in parts:
                exporter = getattr(part.payload, "obj", None)
                if exporter is not None:
                    lease = _Lease()
                    self._leases.add(lease)
                    # set.discard is atomic: safe from whichever thread frees the array.
                    weakref.finalize(exporter, self._leases.discard, lease)
        specs = tuple(_spec(e, n) for e, n in zip(parts, STATE_NAMES, strict=True))
        header = self.header(next_round, specs, "state")
        return Outgoing(header, tuple(e.payload for e in parts))

    def load_state_payload(self, received: Received) -> None:
        phi, momentum = self.decode(received, STATE_NAMES)
        state = OuterState(phi=phi, momentum=momentum if bool(momentum.any()) else None)
        self.restore(received.header.outer_step, state)

    def state_dict(self) -> dict[str, Any]:
        next_round, state = self._snapshot
        return {"state": state.tensors(), "next_round": next_round, "clip": self.clipper.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restore(int(state.get("next_round", 0)), OuterState.from_tensors(state["state"]))
        self.clipper.load(state.get("clip", {}))
