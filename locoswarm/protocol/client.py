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

from locoswarm.protocol._gen import locoswarm_pb2 as pb
from locoswarm.protocol._gen import locoswarm_pb2_grpc as pb_grpc
from locoswarm.protocol.auth import SERVICE, call_metadata
from locoswarm.protocol.config import PROTOCOL_VERSION, ProtocolConfig
from locoswarm.protocol.frames import LocalView, PayloadReader, Received, truncated
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
    ) -> None:
        self.config = config
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

    def _stub(self, address: str) -> pb_grpc.PeerStub:
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
        return pb_grpc.PeerStub(channel)

    async def close(self) -> None:
        channels, self._channels = self._channels, OrderedDict()
        for channel in channels.values():
            await channel.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _metadata(self, method: str) -> tuple[tuple[str, str], ...]:
        return call_metadata(self.config.auth, SERVICE + method, self.peer_id)

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
        frames: AsyncIterator[pb.Frame],
        address: str,
        view: LocalView,
        max_bytes: int,
        first_timeout_s: float,
    ) -> Received:
        """Read one payload; its first frame may take up to ``first_timeout_s`` (the peer may be
        receiving our upload or waiting for its own outer step meanwhile)."""
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
        if await next_frame(frames, address, self.config.frame_timeout_s) is not None:
            raise error_for("out_of_order", address, "a frame after the trailer")
        return received

    async def exchange(
        self, address: str, outgoing: Outgoing, *, view: LocalView, timeout_s: float | None = None
    ) -> Received:
        """Send ``outgoing`` to the node at ``address`` and return its validated reply payload.

        Nothing but the header is sent before the peer accepts. Raises a ``PeerError`` subclass
        (with ``reason``) when the peer refuses, misbehaves, stalls or the deadline passes.
        """
        timeout_s = timeout_s or self.config.call_timeout_s
        accepted: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        async def requests() -> AsyncIterator[pb.Frame]:
            async for frame in outgoing_frames(
                outgoing, self.config.send_chunk_bytes, self.bucket, self.on_transfer
            ):
                # Not a byte of payload before the peer accepts, and none once anything failed.
                if frame.WhichOneof("body") != "header" and not await accepted:
                    return
                yield frame

        async def reply(call: Any) -> Received:
            frames = aiter(call)
            first = await next_frame(frames, address, self.config.frame_timeout_s)
            if first is None:
                raise truncated(address, None)
            raise_if_refused(first, address)
            if first.WhichOneof("body") != "reply":
                raise error_for("out_of_order", address, "expected a reply frame first")
            accepted.set_result(True)
            return await self._read_reply(
                frames, address, view, self.config.limits.max_payload_bytes, timeout_s
            )

        call = self._stub(address).Exchange(
            requests(), timeout=timeout_s, metadata=self._metadata("Exchange")
        )
        try:
            return await self._settle(address, call, reply(call))
        finally:
            if not accepted.done():
                accepted.set_result(False)

    async def fetch_state(
        self, address: str, *, view: LocalView, timeout_s: float | None = None
    ) -> Received:
        """Stream the state of the node at ``address`` (checked against our run and model)."""
        timeout_s = timeout_s or self.config.call_timeout_s
        request = pb.FetchStateRequest(
            protocol_version=PROTOCOL_VERSION, run_id=view.run_id, requester_id=self.peer_id
        )
        call = self._stub(address).FetchState(
            request, timeout=timeout_s, metadata=self._metadata("FetchState")
        )
        work = self._read_reply(
            aiter(call), address, view, self.config.limits.max_state_bytes, timeout_s
        )
        return await self._settle(address, call, work)

    async def status(self, address: str, *, timeout_s: float | None = None) -> StatusInfo:
        """Ask the node at ``address`` what it is doing."""
        call = self._stub(address).Status(
            pb.StatusRequest(),
            timeout=timeout_s or self.config.status_timeout_s,
            metadata=self._metadata("Status"),
        )
        reply: pb.StatusReply = await self._settle(address, call, call)
        return StatusInfo(**{f: getattr(reply, f) for f in StatusInfo.__dataclass_fields__})
