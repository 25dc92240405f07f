"""The Exchange over one plain byte stream: the path to a partner without a gRPC address.

A node that cannot be dialled (behind NAT, or in client mode) is still reachable through the DHT's
libp2p daemon, which relays or hole-punches. This module carries the Exchange's frames over such
a stream; it knows nothing of libp2p: the node opens the stream and hands us its reader and
writer. Every message is a varint length, then the message (``locoswarm.proto`` gives the order):
the caller opens with a ``StreamOpen`` (what gRPC carries as call metadata) and ends its frames
with an empty message; the callee ends its frames the same way and then sends a ``StreamEnd``
(what gRPC carries as the status). The servicer is the gRPC server's own, so every limit,
validation and auth check is the same on both paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from locoswarm.errors import PeerError, PeerUnavailable
from locoswarm.protocol._gen import locoswarm_pb2 as pb
from locoswarm.protocol.auth import PEER_KEY, SERVICE, TokenVerifier
from locoswarm.protocol.frames import InFrame, OutFrame, _varint, parse_frame, serialize
from locoswarm.protocol.reasons import (
    REASON_METADATA_KEY,
    error_for,
    reason_code,
    reason_name,
    reason_of,
)

log = logging.getLogger(__name__)

EXCHANGE = SERVICE + "Exchange"
FETCH_STATE = SERVICE + "FetchState"
METHODS = (EXCHANGE, FETCH_STATE)
"""What the stream path serves: the exchange, and a late joiner's state."""
MAX_OPEN_BYTES = 16 << 10
"""A ``StreamOpen`` is the method and a few short metadata entries."""
_FRAME_OVERHEAD = 64
"""Bytes a chunk frame adds to its data (tag, index, lengths)."""

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter
Opener = Callable[[], Awaitable[tuple[Reader, Writer, str]]]
"""Opens a stream; returns its reader, writer and path (``libp2p``, or ``relayed`` when it
goes through a relay)."""
path: contextvars.ContextVar[str] = contextvars.ContextVar("path", default="grpc")
"""The path of the call this task serves or makes (``grpc``, ``libp2p`` or ``relayed``): what the
node's byte counters are labelled with."""


@dataclass(frozen=True, slots=True)
class StreamRoute:
    """A partner reached over a byte stream the node opens (the libp2p path)."""

    name: str
    """How errors and logs name the partner, e.g. ``libp2p:<peer id>``."""
    open: Opener
    relay_budget: int | None = None
    """The largest payload sent through a relay (relays are slow and cut long transfers);
    None: no limit."""
    after: Callable[[str], Awaitable[None]] | None = None
    """Called with the stream's path once a call that used the stream is over, whatever its
    result (not after a refusal before use: a relayed connection refused for the budget stays
    up, so the hole punching that started on it can finish)."""


async def read_message(reader: Reader, max_bytes: int, peer: str | None) -> bytes | None:
    """One length-prefixed message (``b""`` is the end-of-frames marker); None when the stream
    ends between messages. Raises a ``PeerError`` for a length over ``max_bytes`` or a stream
    that ends mid-message."""
    try:
        first = await reader.read(1)
        if not first:
            return None
        byte, length, shift = first[0], 0, 0
        while True:
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift >= 70:
                raise error_for("malformed", peer, "a message length of more than 10 bytes")
            byte = (await reader.readexactly(1))[0]
        if length > max_bytes:
            raise error_for("too_large", peer, f"a {length}-byte message (limit {max_bytes})")
        return await reader.readexactly(length) if length else b""
    except asyncio.IncompleteReadError:
        raise error_for("truncated", peer, "the stream ended mid-message") from None
    except ConnectionError as exc:
        raise PeerUnavailable(peer, f"the stream broke: {exc}", reason="truncated") from None


async def write_message(writer: Writer, data: bytes | memoryview) -> None:
    """One length-prefixed message; waits while the stream's buffer is full."""
    writer.write(_varint(len(data)))
    if data:
        writer.write(data)
    await writer.drain()


class InFrames:
    """The serialised frames a peer sends, up to its end-of-frames marker (an async iterator of
    bytes, as grpc hands the servicer a request stream)."""

    def __init__(self, reader: Reader, max_bytes: int, peer: str | None) -> None:
        self.reader, self.max_bytes, self.peer = reader, max_bytes, peer
        self.ended = self.closed = False

    def __aiter__(self) -> InFrames:
        return self

    async def __anext__(self) -> bytes:
        if self.ended:
            raise StopAsyncIteration
        data = await read_message(self.reader, self.max_bytes, self.peer)
        if not data:  # the marker, or a stream closed between frames (gRPC: a cancelled call)
            self.ended = True
            self.closed = data is None
            raise StopAsyncIteration
        return data


class ReplyFrames:
    """The callee's frames, parsed; its ``StreamEnd`` ends the iteration or raises the refusal it
    carries, as a gRPC call's status does."""

    def __init__(self, reader: Reader, max_bytes: int, peer: str) -> None:
        self.frames = InFrames(reader, max_bytes, peer)
        self.peer = peer

    def __aiter__(self) -> ReplyFrames:
        return self

    async def __anext__(self) -> InFrame:
        try:
            raw = await anext(self.frames)
        except StopAsyncIteration:
            last = await read_message(self.frames.reader, 4096, self.peer)
            if last is None:
                raise error_for(
                    "truncated", self.peer, "the stream ended without a status"
                ) from None
            end = _parse(pb.StreamEnd, last, self.peer)
            if end.ok:
                raise
            raise error_for(reason_name(end.reason), self.peer, end.detail) from None
        try:
            return parse_frame(raw)
        except DecodeError:
            raise error_for("malformed", self.peer, "a message that is not a Frame") from None


def _parse(kind: Any, raw: bytes, peer: str | None = None) -> Any:
    try:
        return kind.FromString(raw)
    except DecodeError:
        raise error_for("malformed", peer, f"a message that is not a {kind.__name__}") from None


async def send_end(writer: Writer, ok: bool, reason: str, detail: str, timeout_s: float) -> None:
    """The callee's end-of-frames marker and the call's status; a broken stream is ignored."""
    status = pb.StreamEnd(ok=ok)
    if not ok:
        status.reason, status.detail = reason_code(reason), detail[:1024]
    with contextlib.suppress(ConnectionError, TimeoutError):
        async with asyncio.timeout(timeout_s):
            await write_message(writer, b"")
            await write_message(writer, status.SerializeToString())


class _Aborted(Exception):
    """The servicer ended the call with a refusal (already sent)."""


class StreamContext:
    """What the servicer asks of a gRPC context, over a byte stream."""

    def __init__(
        self, writer: Writer, opened: pb.StreamOpen, caller: str, cap_s: float, frame_s: float
    ) -> None:
        self.writer = writer
        self.metadata = dict(opened.metadata)
        self.caller = caller
        timeout = opened.timeout_s if 0 < opened.timeout_s < cap_s else cap_s
        self.deadline = time.monotonic() + timeout
        self.frame_s = frame_s
        self.ended = False

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple(self.metadata.items())

    def peer(self) -> str:
        return f"libp2p:{self.caller}"

    def time_remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    async def write(self, frame: OutFrame) -> None:
        await write_message(self.writer, serialize(frame))

    async def end(self, ok: bool, reason: str = "internal", detail: str = "") -> None:
        """Our end-of-frames marker and the call's status (once)."""
        if not self.ended:
            self.ended = True
            await send_end(self.writer, ok, reason, detail, self.frame_s)

    async def abort(
        self, code: object, detail: str, trailing_metadata: Iterable[tuple[str, str]] = ()
    ) -> None:
        reason = dict(trailing_metadata).get(REASON_METADATA_KEY, "internal")
        await self.end(False, reason, detail)
        raise _Aborted


ExchangeService = Callable[[AsyncIterator[bytes], Any], Awaitable[None]]
FetchStateService = Callable[[pb.FetchStateRequest, Any], Awaitable[None]]


class StreamServer:
    """Serves Exchange calls that arrive on byte streams with the gRPC servicer's own
    ``Exchange`` (the same slots, limits, validation and handler)."""

    def __init__(
        self,
        exchange: ExchangeService,
        *,
        fetch_state: FetchStateService,
        verifier: TokenVerifier | None,
        max_frame_bytes: int,
        call_timeout_s: float,
        frame_timeout_s: float,
        on_reject: Callable[[str], None],
    ) -> None:
        self.exchange = exchange
        self.fetch_state = fetch_state
        self.verifier = verifier
        self.max_frame_bytes = max_frame_bytes
        self.call_timeout_s = call_timeout_s
        self.frame_timeout_s = frame_timeout_s
        self.on_reject = on_reject

    async def serve(
        self, reader: Reader, writer: Writer, *, caller: str, via: str = "libp2p"
    ) -> None:
        """One call from ``caller`` (the stream's authenticated libp2p peer id) over path
        ``via``."""
        path.set(via)  # this task serves this one call
        try:
            await self._serve(reader, writer, caller)
        except _Aborted:
            pass
        except PeerError as exc:  # before the call started: the servicer refuses the rest
            reason = reason_of(exc)
            self.on_reject(reason)
            log.info("refused a libp2p call from %s: %s", caller, exc)
            await send_end(writer, False, reason, exc.message, self.frame_timeout_s)
        except (ConnectionError, TimeoutError) as exc:
            log.info("a libp2p call from %s broke: %r", caller, exc)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    async def _serve(self, reader: Reader, writer: Writer, caller: str) -> None:
        async with asyncio.timeout(self.frame_timeout_s):
            raw = await read_message(reader, MAX_OPEN_BYTES, caller)
        if raw is None:
            return  # opened and closed: nothing to answer
        opened = _parse(pb.StreamOpen, raw, caller)
        context = StreamContext(writer, opened, caller, self.call_timeout_s, self.frame_timeout_s)
        self._check(opened, context.metadata, caller)
        if opened.method == FETCH_STATE:
            async with asyncio.timeout(self.frame_timeout_s):
                raw = await read_message(reader, MAX_OPEN_BYTES, caller)
            request = _parse(pb.FetchStateRequest, raw or b"", caller)
            await self.fetch_state(request, context)
        else:
            await self.exchange(
                InFrames(reader, self.max_frame_bytes + _FRAME_OVERHEAD, caller), context
            )
        await context.end(True)

    def _check(self, opened: pb.StreamOpen, metadata: dict[str, str], caller: str) -> None:
        """Refuse a call that may not start: another method, a bad token, another's name."""
        if opened.method not in METHODS:
            raise error_for("malformed", caller, f"no method {opened.method[:64]!r} on this path")
        if self.verifier is not None:
            try:
                self.verifier.verify(opened.method, metadata)
            except ValueError as exc:
                raise error_for("unauthenticated", caller, str(exc)) from None
        # libp2p authenticated the stream's peer: the call must be made in its own name.
        if metadata.get(PEER_KEY) != caller:
            raise error_for("unauthenticated", caller, "the caller id is not the stream's peer")


async def call_stream(
    route: StreamRoute,
    method: str,
    metadata: Iterable[tuple[str, str]],
    requests: AsyncIterator[OutFrame],
    reply: Callable[[AsyncIterator[InFrame]], Awaitable[Any]],
    *,
    timeout_s: float,
    max_frame_bytes: int,
    payload_bytes: int,
) -> Any:
    """One call of ``method`` over ``route``: send ``requests`` (then our end-of-frames marker)
    while ``reply`` reads the callee's frames; return what ``reply`` returns. Raises a
    ``PeerError`` for a refusal, a broken stream or the deadline, and (reason ``relay_budget``)
    when the stream is relayed and ``payload_bytes`` (the larger payload of the call) is over the
    route's relay budget."""
    token = None
    try:
        async with asyncio.timeout(timeout_s):
            try:
                reader, writer, via = await route.open()
            except (OSError, TimeoutError) as exc:
                raise PeerUnavailable(route.name, f"cannot open a stream: {exc}") from None
            except Exception as exc:  # noqa: BLE001 - libp2p's client raises its own types
                raise PeerUnavailable(route.name, f"cannot open a stream: {exc!r}") from None
            budget = route.relay_budget
            if via == "relayed" and budget is not None and payload_bytes > budget:
                writer.close()
                raise PeerUnavailable(
                    route.name,
                    f"the stream is relayed, and a {payload_bytes}-byte payload is over the "
                    f"relay budget of {budget} bytes (protocol.relay_budget_bytes)",
                    reason="relay_budget",
                )
            token = path.set(via)  # from here on the call uses the stream
            try:
                opened = pb.StreamOpen(method=method, metadata=dict(metadata), timeout_s=timeout_s)
                await write_message(writer, opened.SerializeToString())
                frames = ReplyFrames(reader, max_frame_bytes + _FRAME_OVERHEAD, route.name)
                return await _swap(writer, requests, reply(frames))
            finally:
                writer.close()
    except TimeoutError:
        raise PeerUnavailable(route.name, "call deadline passed", reason="timeout") from None
    except ConnectionError as exc:
        raise PeerUnavailable(route.name, f"the stream broke: {exc}", reason="truncated") from None
    finally:
        if token is not None:
            if route.after is not None:
                await route.after(path.get())
            path.reset(token)


async def _swap(writer: Writer, requests: AsyncIterator[OutFrame], reply: Awaitable[Any]) -> Any:
    """Send ``requests`` and our end-of-frames marker while ``reply`` reads the callee's frames."""

    async def send() -> None:
        async for frame in requests:
            await write_message(writer, serialize(frame))
        await write_message(writer, b"")

    sending = asyncio.ensure_future(send())
    try:
        result = await reply
        await sending
        return result
    finally:
        if not sending.done():
            sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
