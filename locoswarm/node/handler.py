"""The node's side of the wire: admit exchanges for the current round, serve state and status.

Implements ``protocol.ExchangeHandler``. An exchange is admitted only through the matchmaker
(at most one per round) and only once this node has prepared its own message for that round.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import assert_never

from torch import Tensor

from locoswarm.errors import IncompatiblePeer, PeerUnavailable, ProtocolViolation
from locoswarm.node.group import GroupRound, parse_roster, shard_bounds
from locoswarm.node.metrics import PATHS, NodeMetrics
from locoswarm.node.outer import OuterStep, Prepared
from locoswarm.peers import Matchmaker, PeerHealth
from locoswarm.protocol import Header, LocalView, Outgoing, Received, StatusInfo, bytestream
from locoswarm.sync.rounds import Partner, compatible_rounds

log = logging.getLogger(__name__)


class Kind(StrEnum):
    """What an exchange is for (``Header.kind`` on the wire)."""

    OUTER = "outer"
    """A pair's round messages."""
    JOIN = "join"
    """A group proposal (no tensors)."""
    ROSTER = "roster"
    """A group leader's roster."""
    RS = "rs"
    """A group's reduce-scatter shard."""
    AG = "ag"
    """A group's all-gather shard."""
    STATE = "state"
    """Outer state for a late joiner (FetchState only, never an Exchange)."""


def _kind(peer: str, header: Header) -> Kind:
    try:
        return Kind(header.kind)
    except ValueError:
        raise ProtocolViolation(
            peer, f"unknown exchange kind {header.kind[:32]!r}", reason="malformed"
        ) from None


@dataclass
class Round:
    """This node's open round: its message and, as a responder, what the dialler sent."""

    prepared: Prepared
    partner: asyncio.Future[Partner | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    responder_peer: str | None = None
    group: GroupRound | None = None
    """DiLoCo groups of more than 2: the group's shared state this round."""
    path: str = "grpc"
    """The slowest path this round's payloads took (grpc, libp2p, relayed)."""

    def took(self, path: str) -> None:
        if PATHS.index(path) > PATHS.index(self.path):
            self.path = path


class NodeHandler:
    def __init__(
        self,
        *,
        outer: OuterStep,
        matchmaker: Matchmaker[Partner],
        health: PeerHealth,
        metrics: NodeMetrics,
        version: str,
        match_wait_s: float,
        exchange_wait_s: float,
        group_size: int,
        decode: Callable[[Received], Awaitable[Partner]],
        num_peers: Callable[[], int],
    ) -> None:
        self.outer = outer
        self.matchmaker = matchmaker
        self.health = health
        self.metrics = metrics
        self.version = version
        self.match_wait_s = match_wait_s
        self.exchange_wait_s = exchange_wait_s
        self.group_size = group_size
        self.decode = decode
        self.num_peers = num_peers
        self.outer_step = 0
        """The round in progress, or the next one."""
        self.round: Round | None = None
        self.bytes = {"sent": 0, "received": 0}
        self.stopping = False
        self.problems: tuple[str, ...] = ()
        """What the node diagnosed about its own setup (the daemon sets it each round)."""
        self.val_loss = float("nan")

    def open_round(self, prepared: Prepared, *, group: bool = False) -> Round:
        self.outer_step = prepared.outer_step
        self.round = Round(prepared, group=GroupRound() if group else None)
        return self.round

    def close_round(self) -> None:
        current, self.round = self.round, None
        if current is not None and not current.partner.done():
            current.partner.set_result(None)
        if current is not None and current.group is not None:
            current.group.close()

    # -- ExchangeHandler ---------------------------------------------------------------------

    def local_view(self) -> LocalView:
        return LocalView(
            run_id=self.outer.config.run_id,
            model_fingerprint=self.outer.fingerprint,
            outer_step=self.outer_step,
        )

    async def admit(self, peer: str, header: Header) -> Outgoing:
        if self.stopping:
            raise PeerUnavailable(peer, "node is shutting down", reason="shutting_down")
        if header.strategy != self.outer.mode:
            raise IncompatiblePeer(
                peer,
                f"sync mode {header.strategy!r}, ours {self.outer.mode!r}",
                reason="fingerprint",
            )
        kind = _kind(peer, header)
        proposal = Kind.JOIN if self.group_size > 2 else Kind.OUTER
        match kind:
            case Kind.OUTER | Kind.JOIN:
                if kind is not proposal:
                    raise _unexpected(peer, kind)
                return await self._admit_proposal(peer, header)
            case Kind.ROSTER:
                return self._admit_roster(peer, header)
            case Kind.RS | Kind.AG:
                return await self._admit_shard(peer, header, kind)
            case Kind.STATE:
                raise _unexpected(peer, kind)
            case _:
                assert_never(kind)

    def _group_round(self, peer: str, kind: Kind) -> tuple[Round, GroupRound]:
        current = self.round
        if current is None or current.group is None:
            raise _unexpected(peer, kind)
        return current, current.group

    def _admit_roster(self, peer: str, header: Header) -> Outgoing:
        current, _group = self._group_round(peer, Kind.ROSTER)
        if peer != current.responder_peer:
            raise ProtocolViolation(
                peer, "a roster from a peer that did not lead us", reason="malformed"
            )
        return self.outer.control(header.outer_step, Kind.ROSTER)

    async def _admit_shard(self, peer: str, header: Header, kind: Kind) -> Outgoing:
        _current, group = self._group_round(peer, kind)
        # A member may call before our roster arrived: wait for it, boundedly.
        vector = await _group_ready(group.vector, self.match_wait_s)
        if vector is None:
            raise PeerUnavailable(peer, "our group is not ready", reason="busy")
        if tuple(header.members) != group.roster.result():
            raise ProtocolViolation(peer, "a different roster than ours", reason="malformed")
        members = group.members()
        bounds = shard_bounds(vector.numel(), len(members))
        if kind is Kind.RS:
            lo, hi = bounds[group.index(peer)]
            shard = vector[lo:hi]
        else:
            reduced = await _group_ready(group.reduced, self.exchange_wait_s)
            if reduced is None:
                raise PeerUnavailable(peer, "our reduce-scatter did not finish", reason="busy")
            shard = reduced
        return self.outer.shard_message(header.outer_step, kind, shard, group.roster.result())

    async def _admit_proposal(self, peer: str, header: Header) -> Outgoing:
        accepted, why = await self.matchmaker.on_proposal(
            peer,
            header.outer_step,
            wait_s=self.match_wait_s,
            compatible=lambda ours: compatible_rounds(self.outer.rc, ours, header.outer_step),
        )
        current = self.round
        if not accepted or current is None:
            raise PeerUnavailable(peer, why, reason="busy")
        current.responder_peer = peer
        if header.kind == Kind.JOIN:
            return self.outer.control(current.prepared.outer_step, Kind.JOIN)
        return current.prepared.outgoing

    async def on_exchange(self, peer: str, received: Received) -> None:
        current = self.round
        kind = _kind(peer, received.header)
        if current is None:
            raise PeerUnavailable(peer, "the round closed meanwhile", reason="busy")
        match kind:
            case Kind.JOIN:
                return
            case Kind.ROSTER | Kind.RS | Kind.AG:
                await self._on_group(peer, received, current, kind)
            case Kind.OUTER:
                await self._on_message(peer, received, current)
            case Kind.STATE:
                raise _unexpected(peer, kind)
            case _:
                assert_never(kind)

    async def _on_message(self, peer: str, received: Received, current: Round) -> None:
        """A pair partner's message for our round, decoded and handed to the round."""
        if current.responder_peer != peer:
            raise PeerUnavailable(peer, "the round closed meanwhile", reason="busy")
        try:
            tensors = await self.decode(received)
        except ProtocolViolation as exc:
            self.health.violated(peer, asyncio.get_running_loop().time())
            if not current.partner.done():
                current.partner.set_result(None)
            raise ProtocolViolation(
                peer, f"payload did not decode: {exc}", reason="rejected"
            ) from exc
        if not current.partner.done():
            current.partner.set_result(tensors)
        self.health.succeeded(peer)

    async def _on_group(self, peer: str, received: Received, current: Round, kind: Kind) -> None:
        group = current.group
        if group is None:
            raise _unexpected(peer, kind)
        if kind is Kind.ROSTER:
            members = parse_roster(received.header.members, peer)
            if self.outer.peer_id not in [p for p, _ in members]:
                raise ProtocolViolation(peer, "a roster without us", reason="malformed")
            if not group.roster.done():
                group.roster.set_result(tuple(received.header.members))
            return
        vector = group.vector.result()
        lo, hi = shard_bounds(vector.numel(), len(group.members()))[group.index(self.outer.peer_id)]
        if kind is Kind.AG:
            index = group.index(peer)
            lo, hi = shard_bounds(vector.numel(), len(group.members()))[index]
        shard = await asyncio.to_thread(self.outer.decode_shard, received, hi - lo)
        future = group.received(kind, peer)
        if not future.done():
            future.set_result(shard)

    def on_abandoned(self, peer: str, header: Header, reason: str) -> None:
        current = self.round
        if current is None:
            return
        if current.group is not None and header.kind in (Kind.RS, Kind.AG):
            future = current.group.received(header.kind, peer)
            if not future.done():
                future.set_exception(PeerUnavailable(peer, f"group {header.kind} failed: {reason}"))
            return
        if current.responder_peer == peer and not current.partner.done():
            log.info("exchange with %s for round %d abandoned: %s", peer, header.outer_step, reason)
            current.partner.set_result(None)

    async def on_fetch_state(self, peer: str) -> Outgoing:
        if self.stopping:
            raise PeerUnavailable(peer, "node is shutting down", reason="shutting_down")
        return await asyncio.to_thread(self.outer.state_payload)  # whole-model work

    def status(self) -> StatusInfo:
        return StatusInfo(
            peer_id=self.outer.peer_id,
            run_id=self.outer.config.run_id,
            outer_step=self.outer_step,
            strategy=self.outer.mode,
            version=self.version,
            num_peers=self.num_peers(),
            bytes_sent=self.bytes["sent"],
            bytes_received=self.bytes["received"],
            model_fingerprint=self.outer.fingerprint,
            problems=self.problems,
            val_loss=self.val_loss,
        )

    def on_transfer(self, direction: str, num_bytes: int) -> None:
        self.bytes[direction] += num_bytes
        counter = self.metrics.bytes_sent if direction == "sent" else self.metrics.bytes_received
        counter.labels(kind="exchange").inc(num_bytes)
        via = bytestream.path.get()  # the call this chunk belongs to runs in its own context
        self.metrics.path_bytes.labels(path=via, direction=direction).inc(num_bytes)
        if self.round is not None:
            self.round.took(via)

    def on_reject(self, reason: str) -> None:
        self.metrics.rejected.labels(reason=reason).inc()


async def _group_ready(future: asyncio.Future[Tensor], timeout_s: float) -> Tensor | None:
    """The group's value, or None when it did not come in time or the group closed (its
    futures are cancelled). A cancellation of the call itself is not swallowed."""
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout_s)
    except TimeoutError:
        return None
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if future.cancelled() and (task is None or not task.cancelling()):
            return None  # the group closed under us
        raise


def _unexpected(peer: str, kind: Kind) -> ProtocolViolation:
    why = f"unexpected exchange of kind {kind.value!r}"
    return ProtocolViolation(peer, why, reason="malformed")
