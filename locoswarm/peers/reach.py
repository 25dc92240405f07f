"""Reachability probes: ask a peer, over the DHT's own libp2p connection, to dial our gRPC address.

A node behind NAT or a firewall reaches the bootstrap peer (it dialled out), but nobody can dial
its gRPC port; without a test it would learn that only from exchanges that never come. At start a
node asks the peers it joined through (``ask``) to dial the address it announces; every node
serves such probes (``ProbeService``) with a dial function the caller injects (the node's gRPC
health check; this layer knows no gRPC). A probe names an address, nothing else; it is refused
when malformed, when the asker probed less than ``min_interval_s`` ago, or when too many are in
flight, so a node cannot be made into a port scanner.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf.wrappers_pb2 import StringValue
from hivemind.p2p import P2P, P2PContext, PeerID

log = logging.getLogger("locoswarm.peers")

PROBE = "locoswarm.reach.v1"
"""The libp2p protocol name of a probe (a unary protobuf handler)."""
REACHED = "reached"
_ADDRESS = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]{1,253}):(\d{1,5})")


def check_address(address: str) -> str | None:
    """Why ``address`` is not a ``HOST:PORT`` a probe may dial, or None when it is."""
    found = _ADDRESS.fullmatch(address)
    if found is None:
        return f"not a HOST:PORT address: {address[:80]!r}"
    if not 1 <= int(found.group(1)) <= 65535:
        return f"port out of range in {address!r}"
    return None


def peer_of(maddr: str) -> str | None:
    """The peer id at the end of a multiaddr (``.../p2p/<id>``), or None."""
    parts = maddr.rstrip("/").split("/")
    return parts[-1] if len(parts) >= 2 and parts[-2] in ("p2p", "ipfs") else None


class ProbeService:
    """Serves probes: dials the address a peer names and says whether it answered."""

    def __init__(
        self,
        dial: Callable[[str], Awaitable[str | None]],
        *,
        min_interval_s: float = 30.0,
        max_in_flight: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dial = dial
        """Returns None when the address answered, else what went wrong."""
        self.min_interval_s = min_interval_s
        self.max_in_flight = max_in_flight
        self.clock = clock
        self._last: OrderedDict[str, float] = OrderedDict()
        self._in_flight = 0

    async def start(self, p2p: P2P) -> None:
        await p2p.add_protobuf_handler(PROBE, self._handle, StringValue)

    async def probe(self, asker: str, address: str) -> str:
        """The reply to ``asker``'s probe of ``address``: ``REACHED`` or why not."""
        bad = check_address(address)
        if bad is not None:
            return f"refused: {bad}"
        now = self.clock()
        last = self._last.get(asker)
        if last is not None and now - last < self.min_interval_s:
            return f"refused: one probe per {self.min_interval_s:.0f}s"
        if self._in_flight >= self.max_in_flight:
            return "refused: too many probes in flight"
        self._last[asker] = now
        self._last.move_to_end(asker)
        while len(self._last) > 1024:
            self._last.popitem(last=False)
        self._in_flight += 1
        try:
            why = await self.dial(address)
        finally:
            self._in_flight -= 1
        return REACHED if why is None else f"unreachable: {why}"

    async def _handle(self, request: StringValue, context: P2PContext) -> StringValue:
        asker = str(context.remote_id)
        reply = await self.probe(asker, str(request.value))
        log.debug("reachability probe from %s of %s: %s", asker, request.value[:80], reply)
        return StringValue(value=reply)


async def ask(p2p: Any, peer: str, address: str, *, timeout_s: float = 15.0) -> str:
    """Ask ``peer`` to dial ``address``; its reply (``REACHED`` or why not). Raises
    ``TimeoutError`` or the libp2p error when the peer cannot be asked."""
    async with asyncio.timeout(timeout_s):
        reply = await p2p.call_protobuf_handler(
            PeerID.from_base58(peer), PROBE, StringValue(value=address), StringValue
        )
    return str(reply.value)[:300]
