"""The gRPC client of a node: dial peers, swap payloads, fetch state, ask status.

Every call has a deadline; between frames of a payload a progress timeout applies. Replies get
the same checks the server makes. gRPC failures become our exceptions in
``reasons.error_from_status``.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from locoswarm.faultplan import NO_FAULTS, FaultPlan
from locoswarm.protocol._gen import locoswarm_pb2 as pb
from locoswarm.protocol._gen import locoswarm_pb2_grpc as pb_grpc
from locoswarm.protocol.auth import ANY_TARGET, SERVICE, call_metadata
from locoswarm.protocol.bytestream import EXCHANGE, FETCH_STATE, StreamRoute, call_stream
from locoswarm.protocol.config import PROTOCOL_VERSION, ProtocolConfig
from locoswarm.protocol.frames import (
    InFrame,
    LocalView,
    OutFrame,
    PayloadReader,
    Received,
    parse_frame,
    payload_size,
    serialize,
    truncated,
)
from locoswarm.protocol.handler import Outgoing, StatusInfo
from locoswarm.protocol.ratelimit import TokenBucket
from locoswarm.protocol.reasons import error_for, error_from_status
from locoswarm.protocol.streams import (
    check_first,
    next_frame,
    outgoing_frames,
    raise_if_refused,
    read_chunks,
)
from locoswarm.protocol.tls import channel_credentials

T = TypeVar("T")
MAX_CHANNELS = 64
"""Open channels kept; the least recently used one is closed past this."""


class PeerClient:
    """Dials peers by ``host:port``. Keeps a small pool of channels; ``close()`` ends them all."""

    def __init__(
        self,
        config: ProtocolConfig,
        *,
        peer_id: str,
        bucket: TokenBucket | None = None,
        on_transfer: Callable[[str, int], None] | None = None,
        faults: FaultPlan = NO_FAULTS,
    ) -> None:
        self.config = config
        self.faults = faults
        self.peer_id = peer_id
        self.bucket = bucket if bucket is not None else config.make_bucket()
        self.on_transfer = on_transfer or (lambda _direction, _n: None)
        self._credentials = channel_credentials(config.tls)
        self._channels: OrderedDict[str, grpc.aio.Channel] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> PeerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _exchange_method(self, address: str) -> Any:
        """Exchange with a serializer that passes pre-serialised chunk frames through."""
        return self._channel(address).stream_stream(
            SERVICE + "Exchange",
            request_serializer=serialize,
            response_deserializer=parse_frame,  # chunks read in place; see frames.parse_frame
        )

    def _stub(self, address: str) -> pb_grpc.PeerStub:
        return pb_grpc.PeerStub(self._channel(address))

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            options = list(self.config.channel_options())
            if self.config.tls.server_name is not None:
                options.append(("grpc.ssl_target_name_override", self.config.tls.server_name))
            nc = grpc.Compression.NoCompression
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(address, options=options, compression=nc)
            else:
                channel = grpc.aio.secure_channel(
                    address, self._credentials, options=options, compression=nc
                )
            self._channels[address] = channel
            if len(self._channels) > MAX_CHANNELS:
                _, oldest = self._channels.popitem(last=False)
                task = asyncio.get_running_loop().create_task(oldest.close(grace=None))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        self._channels.move_to_end(address)
        return channel

    async def close(self) -> None:
        channels, self._channels = self._channels, OrderedDict()
        for channel in channels.values():
            await channel.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _metadata(self, method: str, target: str) -> tuple[tuple[str, str], ...]:
        return call_metadata(self.config.auth, SERVICE + method, self.peer_id, target=target)

    async def _settle(self, address: str, call: Any, work: Awaitable[T]) -> T:
        """Await ``work`` for ``call``; translate gRPC failures; cancel the call on any error."""
        try:
            return await work
        except grpc.aio.AioRpcError as err:
            raise error_from_status(
                err.code(), err.details() or "", tuple(err.trailing_metadata() or ()), address
            ) from None
        except BaseException:
            call.cancel()
            raise

    async def _read_reply(
        self,
        frames: AsyncIterator[InFrame],
        address: str,
        view: LocalView,
        max_bytes: int,
        first_timeout_s: float,
        *,
        expect_end: bool = True,
    ) -> Received:
        """Read one payload (and, with ``expect_end``, the end of the stream after it); its first
        frame may take up to ``first_timeout_s``."""
        first = await next_frame(frames, address, first_timeout_s)
        if first is None:
            raise truncated(address, None)
        header, msg = check_first(
            first, peer=address, limits=self.config.limits, view=view, max_bytes=max_bytes
        )
        received = await read_chunks(
            frames,
            PayloadReader(header, msg, peer=address),
            peer=address,
            frame_timeout_s=self.config.frame_timeout_s,
            on_transfer=self.on_transfer,
        )
        if expect_end and await next_frame(frames, address, self.config.frame_timeout_s):
            raise error_for("out_of_order", address, "a frame after the trailer")
        return received

    async def exchange(
        self,
        route: str | StreamRoute,
        outgoing: Outgoing,
        *,
        view: LocalView,
        timeout_s: float | None = None,
        check: Callable[[Received], Awaitable[object]] | None = None,
        target: str = ANY_TARGET,
    ) -> Received:
        """Swap payloads with the node at ``route`` (``host:port`` of its gRPC server, or a byte
        stream the node opens: the libp2p path); return its validated payload.

        Only the header goes out before the peer accepts; then both payloads cross at once.
        ``check`` (e.g. decoding) runs on the peer's payload before we confirm receipt with a
        final reply frame; if it raises, the peer is told the exchange failed. We return only
        once the peer has ended the call with OK, i.e. it has our payload too. Raises a
        ``PeerError`` subclass (with ``reason``) when the peer refuses, misbehaves, stalls or the
        deadline passes.
        """
        timeout_s = timeout_s or self.config.call_timeout_s
        address = route.name if isinstance(route, StreamRoute) else route
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[bool] = loop.create_future()
        confirm: asyncio.Future[bool] = loop.create_future()

        async def accept() -> bool:
            return await accepted

        async def requests() -> AsyncIterator[OutFrame]:
            # Not a byte of payload before the peer accepts, and none once anything failed.
            async for frame in outgoing_frames(
                outgoing,
                self.config.send_chunk_bytes,
                self.bucket,
                self.on_transfer,
                faults=self.faults,
                peer=address,
                before_payload=accept,
            ):
                yield frame
            if await confirm:
                yield pb.Frame(reply=pb.Reply(accepted=True))

        async def reply(call: AsyncIterator[InFrame]) -> Received:
            frames = aiter(call)
            first = await next_frame(frames, address, self.config.frame_timeout_s)
            if first is None:
                raise truncated(address, None)
            raise_if_refused(first, address)
            if first.WhichOneof("body") != "reply":
                raise error_for("out_of_order", address, "expected a reply frame first")
            accepted.set_result(True)
            received = await self._read_reply(
                frames,
                address,
                view,
                self.config.limits.max_payload_bytes,
                self.config.frame_timeout_s,
                expect_end=False,
            )
            if check is not None:
                await check(received)
            confirm.set_result(True)
            # The call ends OK once the peer has our payload and our confirmation.
            last = await next_frame(frames, address, timeout_s)
            if last is not None:
                raise_if_refused(last, address)  # it found our payload bad
                raise error_for("out_of_order", address, "a frame after the payload")
            return received

        try:
            if isinstance(route, StreamRoute):
                received: Received = await call_stream(
                    route,
                    EXCHANGE,
                    self._metadata("Exchange", target),
                    requests(),
                    reply,
                    timeout_s=timeout_s,
                    max_frame_bytes=self.config.limits.max_chunk_bytes,
                    payload_bytes=payload_size(outgoing.payload),
                )
                return received
            call = self._exchange_method(route)(
                requests(), timeout=timeout_s, metadata=self._metadata("Exchange", target)
            )
            return await self._settle(route, call, reply(call))
        finally:
            for future in (accepted, confirm):
                if not future.done():
                    future.set_result(False)

    async def fetch_state(
        self,
        route: str | StreamRoute,
        *,
        view: LocalView,
        timeout_s: float | None = None,
        target: str = ANY_TARGET,
        expect_bytes: int = 0,
    ) -> Received:
        """Stream the state of the node at ``route`` (its gRPC ``host:port``, or a byte stream:
        the libp2p path), checked against our run and model. ``expect_bytes``: the state's
        size, checked against a relayed stream's budget before anything is asked."""
        timeout_s = timeout_s or self.config.call_timeout_s
        request = pb.FetchStateRequest(
            protocol_version=PROTOCOL_VERSION, run_id=view.run_id, requester_id=self.peer_id
        )
        limit = self.config.limits.max_state_bytes
        if isinstance(route, StreamRoute):

            async def requests() -> AsyncIterator[OutFrame]:
                yield request.SerializeToString()

            async def reply(frames: AsyncIterator[InFrame]) -> Received:
                return await self._read_reply(frames, route.name, view, limit, timeout_s)

            received: Received = await call_stream(
                route,
                FETCH_STATE,
                self._metadata("FetchState", target),
                requests(),
                reply,
                timeout_s=timeout_s,
                max_frame_bytes=self.config.limits.max_chunk_bytes,
                payload_bytes=expect_bytes,
            )
            return received
        address = route
        call = self._stub(address).FetchState(
            request, timeout=timeout_s, metadata=self._metadata("FetchState", target)
        )
        work = self._read_reply(
            aiter(call), address, view, self.config.limits.max_state_bytes, timeout_s
        )
        return await self._settle(address, call, work)

    async def reachable(self, address: str, *, timeout_s: float = 5.0) -> str | None:
        """Whether a node answers on ``address``: None when its health service says SERVING,
        else what went wrong (a fresh channel each time: a probe of somebody else's address)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        options = list(self.config.channel_options())
        if self._credentials is None:
            channel = grpc.aio.insecure_channel(address, options=options)
        else:
            channel = grpc.aio.secure_channel(address, self._credentials, options=options)
        try:
            async with channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=SERVICE.strip("/")), timeout=timeout_s
                )
        except grpc.aio.AioRpcError as err:
            return f"{err.code().name}: {(err.details() or '')[:120]}"
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            return f"health status {reply.status}"
        return None

    async def status(
        self, address: str, *, timeout_s: float | None = None, target: str = ANY_TARGET
    ) -> StatusInfo:
        """Ask the node at ``address`` what it is doing."""
        call = self._stub(address).Status(
            pb.StatusRequest(),
            timeout=timeout_s or self.config.status_timeout_s,
            metadata=self._metadata("Status", target),
        )
        reply: pb.StatusReply = await self._settle(address, call, call)
        fields = {f: getattr(reply, f) for f in StatusInfo.__dataclass_fields__}
        fields["problems"] = tuple(str(p) for p in fields["problems"])
        return StatusInfo(**fields)
