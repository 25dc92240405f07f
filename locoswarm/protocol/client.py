"""The gRPC client of a node: dial peers, swap payloads, fetch state, ask status.

Every call has a deadline and a per-frame progress timeout; replies are checked with the same
frame checks the server uses. gRPC failures become our exceptions in ``reasons.error_from_status``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from locoswarm.errors import PeerUnavailable
from locoswarm.protocol._gen import locoswarm_pb2 as pb
from locoswarm.protocol._gen import locoswarm_pb2_grpc as pb_grpc
from locoswarm.protocol.auth import SERVICE, call_metadata
from locoswarm.protocol.config import PROTOCOL_VERSION, ProtocolConfig
from locoswarm.protocol.frames import (
    LocalView,
    PayloadReader,
    Received,
    check_header,
    encode_frames,
    expect_header,
    truncated,
)
from locoswarm.protocol.handler import Outgoing, StatusInfo
from locoswarm.protocol.ratelimit import TokenBucket
from locoswarm.protocol.reasons import error_for, error_from_status, reason_name
from locoswarm.protocol.tls import channel_credentials


def _raise_if_refused(frame: pb.Frame, address: str) -> None:
    """A reject reply may come at any point of a stream; it ends the call with its reason."""
    if frame.WhichOneof("body") == "reply" and not frame.reply.accepted:
        raise error_for(reason_name(frame.reply.reason), address, frame.reply.detail)


@dataclass
class _Gate:
    """Holds back an Exchange's payload until the peer accepts; stops it once anything fails."""

    accepted: asyncio.Future[bool]
    halted: bool = False

    def halt(self) -> None:
        self.halted = True
        if not self.accepted.done():
            self.accepted.set_result(False)


class PeerClient:
    """Dials peers by ``host:port``. One channel per address, closed by ``close()``."""

    def __init__(
        self,
        config: ProtocolConfig,
        *,
        peer_id: str,
        bucket: TokenBucket | None = None,
        on_transfer: Callable[[str, int], None] | None = None,
    ) -> None:
        self.config = config
        self.peer_id = peer_id
        if bucket is None and config.max_upload_bytes_per_s is not None:
            bucket = TokenBucket(config.max_upload_bytes_per_s, config.chunk_bytes)
        self.bucket = bucket
        self.on_transfer = on_transfer or (lambda _direction, _n: None)
        self._credentials = channel_credentials(config.tls)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> pb_grpc.PeerStub:
        channel = self._channels.get(address)
        if channel is None:
            options = list(self.config.channel_options())
            if self.config.tls.server_name is not None:
                options.append(("grpc.ssl_target_name_override", self.config.tls.server_name))
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(address, options=options)
            else:
                channel = grpc.aio.secure_channel(address, self._credentials, options=options)
            self._channels[address] = channel
        return pb_grpc.PeerStub(channel)

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()

    def _metadata(self, method: str) -> tuple[tuple[str, str], ...]:
        return call_metadata(self.config.auth, SERVICE + method, self.peer_id)

    async def _frames_out(
        self, outgoing: Outgoing, gate: _Gate | None = None
    ) -> AsyncIterator[pb.Frame]:
        """Header, then (once the peer accepts) chunks and trailer; stop as soon as it refuses."""
        for frame in encode_frames(outgoing.header, outgoing.payload, self.config.chunk_bytes):
            # Not a byte of payload before the peer accepts, and none after it refuses.
            if (
                gate is not None
                and frame.WhichOneof("body") != "header"
                and (not await gate.accepted or gate.halted)
            ):
                return
            if frame.WhichOneof("body") == "chunk":
                size = len(frame.chunk.data)
                if self.bucket is not None:
                    await self.bucket.take(size)
                self.on_transfer("sent", size)
            yield frame

    async def _next(self, frames: AsyncIterator[pb.Frame], address: str) -> pb.Frame | None:
        try:
            async with asyncio.timeout(self.config.frame_timeout_s):
                return await anext(frames)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise PeerUnavailable(
                address, f"no frame for {self.config.frame_timeout_s:.1f}s", reason="timeout"
            ) from None

    async def _read_payload(
        self, frames: AsyncIterator[pb.Frame], address: str, view: LocalView, max_bytes: int
    ) -> Received:
        first = await self._next(frames, address)
        if first is None:
            raise truncated(address, None)
        _raise_if_refused(first, address)
        msg = expect_header(first, peer=address)
        header = check_header(msg, self.config.limits, view, peer=address, max_bytes=max_bytes)
        reader = PayloadReader(header, msg, peer=address)
        while True:
            frame = await self._next(frames, address)
            if frame is None:
                raise truncated(address, reader)
            if frame.WhichOneof("body") == "chunk":
                self.on_transfer("received", len(frame.chunk.data))
            _raise_if_refused(frame, address)
            received = reader.feed(frame)
            if received is not None:
                break
        extra = await self._next(frames, address)  # the end of the stream carries the status
        if extra is not None:
            raise error_for("out_of_order", address, "a frame after the trailer")
        return received

    async def _settle(self, address: str, call: Any, work: Any) -> Any:
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

    async def exchange(
        self, address: str, outgoing: Outgoing, *, view: LocalView, timeout_s: float | None = None
    ) -> Received:
        """Send ``outgoing`` to the node at ``address`` and return its validated reply payload.

        Raises a ``PeerError`` subclass (with ``reason``) when the peer refuses, misbehaves,
        stalls past ``frame_timeout_s`` or the call passes its deadline.
        """
        gate = _Gate(asyncio.get_running_loop().create_future())
        call = self._stub(address).Exchange(
            self._frames_out(outgoing, gate),
            timeout=timeout_s or self.config.call_timeout_s,
            metadata=self._metadata("Exchange"),
        )
        try:
            work = self._reply(call, address, view, gate)
            received: Received = await self._settle(address, call, work)
        finally:
            gate.halt()
        return received

    async def _reply(self, call: Any, address: str, view: LocalView, gate: _Gate) -> Received:
        frames = aiter(call)
        first = await self._next(frames, address)
        if first is None:
            raise truncated(address, None)
        if first.WhichOneof("body") != "reply":
            raise error_for("out_of_order", address, "expected a reply frame first")
        _raise_if_refused(first, address)
        gate.accepted.set_result(True)
        return await self._read_payload(frames, address, view, self.config.limits.max_payload_bytes)

    async def fetch_state(
        self, address: str, *, view: LocalView, timeout_s: float | None = None
    ) -> Received:
        """Stream the state of the node at ``address`` (checked against our run and model)."""
        request = pb.FetchStateRequest(
            protocol_version=PROTOCOL_VERSION, run_id=view.run_id, requester_id=self.peer_id
        )
        call = self._stub(address).FetchState(
            request,
            timeout=timeout_s or self.config.call_timeout_s,
            metadata=self._metadata("FetchState"),
        )
        work = self._read_payload(aiter(call), address, view, self.config.limits.max_state_bytes)
        received: Received = await self._settle(address, call, work)
        return received

    async def status(self, address: str, *, timeout_s: float | None = None) -> StatusInfo:
        """Ask the node at ``address`` what it is doing."""
        call = self._stub(address).Status(
            pb.StatusRequest(),
            timeout=timeout_s or self.config.status_timeout_s,
            metadata=self._metadata("Status"),
        )
        reply: pb.StatusReply = await self._settle(address, call, call)
        return StatusInfo(
            peer_id=reply.peer_id,
            run_id=reply.run_id,
            outer_step=reply.outer_step,
            strategy=reply.strategy,
            version=reply.version,
            num_peers=reply.num_peers,
            bytes_sent=reply.bytes_sent,
            bytes_received=reply.bytes_received,
            model_fingerprint=reply.model_fingerprint,
        )
