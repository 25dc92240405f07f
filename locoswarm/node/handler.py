"""The node's side of the wire: admit exchanges for the current round, serve state and status.

Implements ``protocol.ExchangeHandler``. An exchange is admitted only through the matchmaker
(at most one per round) and only once this node has prepared its own message for that round.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from torch import Tensor

from locoswarm.errors import IncompatiblePeer, PeerUnavailable, ProtocolViolation
from locoswarm.node.metrics import NodeMetrics
from locoswarm.node.outer import OuterStep, Prepared
from locoswarm.peers import Matchmaker, PeerHealth
from locoswarm.protocol import Header, LocalView, Outgoing, Received, StatusInfo

log = logging.getLogger(__name__)


@dataclass
class Round:
    """This node's open round: its message and, as a responder, what the dialler sent."""

    prepared: Prepared
    partner: asyncio.Future[list[Tensor] | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    responder_peer: str | None = None


class NodeHandler:
    def __init__(
        self,
        *,
        outer: OuterStep,
        matchmaker: Matchmaker[list[Tensor]],
        health: PeerHealth,
        metrics: NodeMetrics,
        version: str,
        match_wait_s: float,
        decode: Callable[[Received, tuple[str, ...] | None], Awaitable[list[Tensor]]],
        num_peers: Callable[[], int],
    ) -> None:
        self.outer = outer
        self.matchmaker = matchmaker
        self.health = health
        self.metrics = metrics
        self.version = version
        self.match_wait_s = match_wait_s
        self.decode = decode
        self.num_peers = num_peers
        self.outer_step = 0
        """The round in progress, or the next one."""
        self.round: Round | None = None
        self.bytes = {"sent": 0, "received": 0}
        self.stopping = False

    def open_round(self, prepared: Prepared) -> Round:
        self.outer_step = prepared.outer_step
        self.round = Round(prepared)
        return self.round

    def close_round(self) -> None:
        current, self.round = self.round, None
        if current is not None and not current.partner.done():
            current.partner.set_result(None)

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
        if header.kind != "outer":
            raise ProtocolViolation(peer, f"exchange of kind {header.kind!r}", reason="malformed")
        accepted, why = await self.matchmaker.on_proposal(
            peer, header.outer_step, wait_s=self.match_wait_s
        )
        current = self.round
        if not accepted or current is None:
            raise PeerUnavailable(peer, why, reason="busy")
        current.responder_peer = peer
        return current.prepared.outgoing

    async def on_exchange(self, peer: str, received: Received) -> None:
        current = self.round
        if current is None or current.responder_peer != peer:
            raise PeerUnavailable(peer, "the round closed meanwhile", reason="busy")
        try:
            tensors = await self.decode(received, None)
        except ProtocolViolation as exc:
            self.health.violated(peer, asyncio.get_running_loop().time())
            if not current.partner.done():
                current.partner.set_result(None)
            raise ProtocolViolation(
                peer, f"payload did not decode: {exc}", reason="rejected"
            ) from exc
        if not current.partner.done():
            current.partner.set_result(tensors)

    def on_abandoned(self, peer: str, header: Header, reason: str) -> None:
        current = self.round
        if current is not None and current.responder_peer == peer and not current.partner.done():
            log.info("exchange with %s for round %d abandoned: %s", peer, header.outer_step, reason)
            current.partner.set_result(None)

    async def on_fetch_state(self, peer: str) -> Outgoing:
        if self.stopping:
            raise PeerUnavailable(peer, "node is shutting down", reason="shutting_down")
        return self.outer.state_payload(self.outer_step)

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
        )

    def on_transfer(self, direction: str, num_bytes: int) -> None:
        self.bytes[direction] += num_bytes
        counter = self.metrics.bytes_sent if direction == "sent" else self.metrics.bytes_received
        counter.labels(kind="exchange").inc(num_bytes)

    def on_reject(self, reason: str) -> None:
        self.metrics.rejected.labels(reason=reason).inc()
