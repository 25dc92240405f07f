"""How a node reaches a partner: its gRPC address first, else a stream of the DHT's libp2p daemon.

A partner that announced a gRPC address is dialled there. One without (behind NAT, or in client
mode) is dialled by peer id over hivemind's ``p2pd``, which reaches it directly, hole-punched or
through a relay; the exchange's frames then travel over that stream (``protocol.bytestream``),
with the same auth and checks. A relayed stream carries payloads up to
``protocol.relay_budget_bytes`` only (relays are slow, and p2pd's cut a connection after about
128 KiB); a larger message means a solo step this round, and a later round may find the
connection upgraded to a direct one (a relayed connection refused before use is kept, so the
hole punching that started on it can finish).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from hivemind.p2p import P2P, PeerID

from locoswarm.node.metrics import NodeMetrics
from locoswarm.peers import PeerRecord
from locoswarm.protocol.bytestream import Reader, StreamRoute, StreamServer, Writer

log = logging.getLogger(__name__)

EXCHANGE_PROTOCOL = "/locoswarm/exchange/1"
"""The libp2p protocol name of the exchange's stream handler."""


def path_of(addr: object) -> str:
    """``relayed`` for a connection through a circuit relay, else ``libp2p``."""
    return "relayed" if "p2p-circuit" in str(addr) else "libp2p"


class Paths:
    """Routes to partners, and the libp2p side of our own server."""

    def __init__(
        self,
        p2p: P2P,
        record_of: Callable[[str], PeerRecord | None],
        metrics: NodeMetrics,
        *,
        relay_budget: int,
    ) -> None:
        self.p2p = p2p
        self.record_of = record_of
        self.metrics = metrics
        self.relay_budget = relay_budget

    def route(self, peer: str) -> str | StreamRoute | None:
        """Its gRPC address; else a libp2p route when it serves exchanges there; else None."""
        record = self.record_of(peer)
        return None if record is None else self.route_to(record)

    def route_to(self, record: PeerRecord) -> str | StreamRoute | None:
        """How to reach the node of ``record`` (``route``, from a record in hand)."""
        peer = record.peer_id
        if record.address is not None:
            return record.address
        if not record.over_libp2p:
            return None
        return StreamRoute(
            f"libp2p:{peer}",
            lambda: self._open(peer),
            relay_budget=self.relay_budget,
            after=lambda via: self._after(peer, via),
        )

    async def _open(self, peer: str) -> tuple[Reader, Writer, str]:
        info, reader, writer = await self.p2p.call_binary_stream_handler(
            PeerID.from_base58(peer), EXCHANGE_PROTOCOL
        )
        return reader, writer, path_of(info.addr)

    async def _after(self, peer: str, via: str) -> None:
        """Drop a relayed connection once its exchange is over: p2pd's relays cap the data of
        a relayed connection as a whole (about 128 KiB), so each exchange gets a fresh one
        (measured behind NAT: without this, every third 45 KB exchange was cut)."""
        if via != "relayed":
            return
        try:  # hivemind's P2P has no disconnect of its own; its daemon client does
            await asyncio.wait_for(self.p2p._client.disconnect(PeerID.from_base58(peer)), 5)
        except Exception as exc:  # noqa: BLE001 - the next exchange finds out anyway
            log.debug("could not drop the relayed connection to %s: %r", peer, exc)

    async def serve(self, streams: StreamServer) -> None:
        """Serve exchanges that arrive over libp2p (every node does, with an address or not)."""

        async def handle(info: Any, reader: Reader, writer: Writer) -> None:
            await streams.serve(reader, writer, caller=str(info.peer_id), via=path_of(info.addr))

        await self.p2p.add_binary_stream_handler(EXCHANGE_PROTOCOL, handle)
