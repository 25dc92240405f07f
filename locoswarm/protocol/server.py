"""The gRPC server of a node: the ``Peer`` service, health and reflection, limits and auth.

The servicer checks every frame (``frames.py``) and hands the node's ``ExchangeHandler`` only
complete, validated payloads. Exceptions become gRPC statuses here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from locoswarm.errors import PeerError, PeerUnavailable
from locoswarm.protocol._gen import locoswarm_pb2 as pb
from locoswarm.protocol._gen import locoswarm_pb2_grpc as pb_grpc
from locoswarm.protocol.auth import PEER_KEY, AuthInterceptor
from locoswarm.protocol.config import PROTOCOL_VERSION, ProtocolConfig
from locoswarm.protocol.frames import (
    PayloadReader,
    Received,
    check_header,
    encode_frames,
    expect_header,
    truncated,
)
from locoswarm.protocol.handler import ExchangeHandler, Outgoing
from locoswarm.protocol.ratelimit import TokenBucket
from locoswarm.protocol.reasons import (
    REASON_METADATA_KEY,
    error_for,
    reason_code,
    reason_of,
    status_of,
)
from locoswarm.protocol.tls import server_credentials

log = logging.getLogger(__name__)

SERVICE_NAME = "locoswarm.v1.Peer"
Context: TypeAlias = Any  # grpc.aio.ServicerContext; grpcio ships no type information


def _peer_of(context: Context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == PEER_KEY:
            text = value if isinstance(value, str) else value.decode(errors="replace")
            return text[:256]
    return str(context.peer())


class _Tracked:
    """An async iterator of frames that remembers whether the sender half-closed."""

    def __init__(self, frames: AsyncIterator[pb.Frame]) -> None:
        self.frames = frames
        self.ended = False

    def __aiter__(self) -> _Tracked:
        return self

    async def __anext__(self) -> pb.Frame:
        try:
            return await anext(self.frames)
        except StopAsyncIteration:
            self.ended = True
            raise


class _Servicer(pb_grpc.PeerServicer):
    def __init__(
        self, config: ProtocolConfig, handler: ExchangeHandler, bucket: TokenBucket | None
    ) -> None:
        self.config = config
        self.limits = config.limits
        self.handler = handler
        self.bucket = bucket
        self.busy = 0
        self.stopping = False

    @contextlib.contextmanager
    def _slot(self, peer: str) -> Any:
        if self.stopping:
            raise PeerUnavailable(peer, "node is shutting down", reason="shutting_down")
        if self.busy >= self.config.max_concurrent_exchanges:
            raise PeerUnavailable(peer, f"{self.busy} transfers in flight (limit)", reason="busy")
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1

    async def _next(self, frames: AsyncIterator[pb.Frame], peer: str) -> pb.Frame | None:
        try:
            async with asyncio.timeout(self.config.frame_timeout_s):
                return await anext(frames)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise PeerUnavailable(
                peer, f"no frame for {self.config.frame_timeout_s:.1f}s", reason="timeout"
            ) from None

    async def _read_payload(
        self, frames: AsyncIterator[pb.Frame], peer: str, reader: PayloadReader
    ) -> Received:
        while True:
            frame = await self._next(frames, peer)
            if frame is None:
                raise truncated(peer, reader)
            if frame.WhichOneof("body") == "chunk":
                self.handler.on_transfer("received", len(frame.chunk.data))
            received = reader.feed(frame)
            if received is not None:
                return received

    async def _frames_out(self, outgoing: Outgoing) -> AsyncIterator[pb.Frame]:
        for frame in encode_frames(outgoing.header, outgoing.payload, self.config.chunk_bytes):
            if frame.WhichOneof("body") == "chunk":
                size = len(frame.chunk.data)
                if self.bucket is not None:
                    await self.bucket.take(size)
                self.handler.on_transfer("sent", size)
            yield frame

    def _note(self, exc: PeerError) -> str:
        """Count and log a refusal; return its wire reason."""
        reason = reason_of(exc)
        self.handler.on_reject(reason)
        log.info("refused a call from %s: %s", exc.peer, exc)
        return reason

    async def _refuse(self, context: Context, exc: PeerError, *, noted: bool = False) -> None:
        reason = reason_of(exc) if noted else self._note(exc)
        await context.abort(
            status_of(reason),
            f"{reason}: {exc.message}",
            trailing_metadata=((REASON_METADATA_KEY, reason),),
        )

    async def _drain(self, frames: AsyncIterator[pb.Frame], peer: str) -> None:
        """After refusing mid-stream, read and drop what the sender still has in flight.

        Ending the call while the sender is still writing makes grpc.aio clients report INTERNAL
        instead of our status (grpc/grpc#36066), so we wait, within a byte and time budget, for
        the sender to see the reject frame and half-close.
        """
        budget = 4 * self.limits.max_chunk_bytes
        with contextlib.suppress(PeerError):
            while budget > 0:
                frame = await self._next(frames, peer)
                if frame is None:
                    return
                budget -= frame.ByteSize()

    async def Exchange(
        self, request_iterator: AsyncIterator[pb.Frame], context: Context
    ) -> AsyncIterator[pb.Frame]:
        peer = _peer_of(context)
        frames = _Tracked(aiter(request_iterator))
        try:
            with self._slot(peer):
                first = await self._next(frames, peer)
                if first is None:
                    raise truncated(peer, None)
                msg = expect_header(first, peer=peer)
                header = check_header(
                    msg,
                    self.limits,
                    self.handler.local_view(),
                    peer=peer,
                    max_bytes=self.limits.max_payload_bytes,
                )
                await self.handler.admit(peer, header)
                yield pb.Frame(reply=pb.Reply(accepted=True))
                reader = PayloadReader(header, msg, peer=peer)
                received = await self._read_payload(frames, peer, reader)
                outgoing = await self.handler.on_exchange(peer, received)
                async for frame in self._frames_out(outgoing):
                    yield frame
        except PeerError as exc:
            reason = self._note(exc)
            # The reply frame says why even where the status cannot get through (see _drain).
            yield pb.Frame(
                reply=pb.Reply(accepted=False, reason=reason_code(reason), detail=exc.message)
            )
            if not frames.ended and reason != "timeout":
                await self._drain(frames, peer)
            await self._refuse(context, exc, noted=True)
        except Exception:
            log.exception("Exchange from %s failed on our side", peer)
            await self._refuse(context, error_for("internal", peer, "internal error"))

    async def FetchState(
        self, request: pb.FetchStateRequest, context: Context
    ) -> AsyncIterator[pb.Frame]:
        peer = _peer_of(context)
        try:
            view = self.handler.local_view()
            if request.protocol_version != PROTOCOL_VERSION:
                raise error_for("version", peer, f"protocol version {request.protocol_version}")
            if request.run_id != view.run_id:
                raise error_for("wrong_run", peer, f"run {request.run_id[:64]!r}")
            with self._slot(peer):
                outgoing = await self.handler.on_fetch_state(peer)
                async for frame in self._frames_out(outgoing):
                    yield frame
        except PeerError as exc:
            await self._refuse(context, exc)
        except Exception:
            log.exception("FetchState for %s failed on our side", peer)
            await self._refuse(context, error_for("internal", peer, "internal error"))

    async def Status(self, request: pb.StatusRequest, context: Context) -> pb.StatusReply:
        info = self.handler.status()
        return pb.StatusReply(
            peer_id=info.peer_id,
            run_id=info.run_id,
            outer_step=info.outer_step,
            strategy=info.strategy,
            version=info.version,
            num_peers=info.num_peers,
            bytes_sent=info.bytes_sent,
            bytes_received=info.bytes_received,
            model_fingerprint=info.model_fingerprint,
        )


@dataclass
class PeerServer:
    """A running server. Use ``async with PeerServer.start(config, handler) as server``."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    servicer: _Servicer

    @classmethod
    @contextlib.asynccontextmanager
    async def start(
        cls, config: ProtocolConfig, handler: ExchangeHandler, *, bucket: TokenBucket | None = None
    ) -> AsyncIterator[PeerServer]:
        """Bind, serve, and on exit stop within ``config.shutdown_grace_s``.

        ``bucket`` caps what this node sends; pass the node's client bucket to share one cap.
        """
        if bucket is None and config.max_upload_bytes_per_s is not None:
            bucket = TokenBucket(config.max_upload_bytes_per_s, config.chunk_bytes)
        interceptors = []
        if config.auth.secret is not None:
            interceptors.append(AuthInterceptor(config.auth, on_reject=handler.on_reject))
        server = grpc.aio.server(
            interceptors=interceptors,
            options=config.channel_options(),
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        servicer = _Servicer(config, handler, bucket)
        pb_grpc.add_PeerServicer_to_server(servicer, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        address = f"{config.host}:{config.port}"
        credentials = server_credentials(config.tls)
        try:
            if credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise OSError(f"cannot bind the gRPC server to {address}: {exc}") from exc
        await server.start()
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        try:
            yield cls(server=server, port=port, health=health_servicer, servicer=servicer)
        finally:
            servicer.stopping = True
            await health_servicer.enter_graceful_shutdown()
            await server.stop(config.shutdown_grace_s)

    @property
    def busy(self) -> int:
        """Exchange and FetchState calls in flight."""
        return self.servicer.busy

    async def begin_shutdown(self) -> None:
        """Refuse new transfers as shutting down and report NOT_SERVING; calls in flight go on."""
        self.servicer.stopping = True
        await self.health.enter_graceful_shutdown()
