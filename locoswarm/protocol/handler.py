"""What the server calls: the interface ``node/`` implements, in bytes and headers only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from locoswarm.protocol.frames import Header, LocalView, Payload, Received


@dataclass(slots=True)
class Outgoing:
    """A payload to send: its header and exactly ``header.total_bytes`` bytes (in one buffer or
    several, sent back to back)."""

    header: Header
    payload: Payload = field(repr=False)


@dataclass(frozen=True, kw_only=True, slots=True)
class StatusInfo:
    """What ``Status`` reports about a node."""

    peer_id: str
    run_id: str
    outer_step: int
    strategy: str
    version: str
    num_peers: int
    bytes_sent: int
    bytes_received: int
    model_fingerprint: str
    problems: tuple[str, ...] = ()
    """Misconfigurations the node diagnosed about itself, each naming its fix."""
    val_loss: float = float("nan")


class ExchangeHandler(Protocol):
    """The node side of the wire. Raise a ``PeerError`` subclass to refuse; set its ``reason``.

    An Exchange is a swap: once ``admit`` returns our payload, both payloads cross at once, and
    then exactly one of ``on_exchange`` (both arrived, the dialler confirmed) or ``on_abandoned``
    is called for it.
    """

    def local_view(self) -> LocalView:
        """Our run id, model fingerprint and outer step, against which headers are checked."""
        ...

    async def admit(self, peer: str, header: Header) -> Outgoing:
        """A header passed the protocol checks: accept by returning our payload for the swap.

        Refuse (e.g. ``PeerUnavailable(peer, ..., reason="busy")``) to stop it before any payload.
        """
        ...

    async def on_exchange(self, peer: str, received: Received) -> None:
        """The dialler's complete, validated payload, after it confirmed it has ours."""
        ...

    def on_abandoned(self, peer: str, header: Header, reason: str) -> None:
        """An admitted exchange failed; nothing of it may be applied."""
        ...

    async def on_fetch_state(self, peer: str) -> Outgoing:
        """Our current state for a late joiner."""
        ...

    def status(self) -> StatusInfo:
        """A snapshot for ``Status``."""
        ...

    def on_transfer(self, direction: str, num_bytes: int) -> None:
        """Told of every payload chunk sent ("sent") or received ("received")."""
        ...

    def on_reject(self, reason: str) -> None:
        """Told of every call this server refused, by reason (for metrics)."""
        ...
