"""The gRPC server of a node: the ``Peer`` service, health and reflection, limits and auth.

The servicer checks every frame and hands the node's ``ExchangeHandler`` only complete,
validated payloads. Every call runs under the server's own deadline, every write under the
progress timeout, and exceptions become gRPC statuses here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from locoswarm.errors import PeerError, PeerUnavailable
from locoswarm.faultplan import NO_FAULTS, FaultPlan
from locoswarm.protocol._gen import locoswarm_pb2 as pb
from locoswarm.protocol.auth import PEER_KEY, AuthInterceptor, TokenVerifier
from locoswarm.protocol.bytestream import StreamServer
from locoswarm.protocol.config import PROTOCOL_VERSION, ProtocolConfig
from locoswarm.protocol.frames import Header, PayloadReader, serialize, truncated
from locoswarm.protocol.handler import ExchangeHandler, Outgoing
from locoswarm.protocol.ratelimit import LogLimiter, TokenBucket
from locoswarm.protocol.reasons import (
    REASON_METADATA_KEY,
    error_for,
    reason_code,
    reason_of,
    status_of,
)
from locoswarm.protocol.streams import (
    TrackedFrames,
    check_first,
    next_frame,
    outgoing_frames,
    raise_if_refused,
    read_chunks,
)
from locoswarm.protocol.tls import server_credentials

log = logging.getLogger(__name__)

SERVICE_NAME = "locoswarm.v1.Peer"
Context: TypeAlias = Any  # grpc.aio.ServicerContext; grpcio ships no type information
_DRAIN_FRAME_COST = 4096  # bytes charged per drained frame, so empty frames cannot stall us


def peer_of(context: Context, max_chars: int) -> str:
    """The caller's id from call metadata (the one the auth interceptor checked)."""
    values = [v for k, v in context.invocation_metadata() or () if k == PEER_KEY]
    if len(values) > 1:
        raise error_for("malformed", None, f"{len(values)} {PEER_KEY} entries in call metadata")
    if not values:
        return str(context.peer())
    text = values[0] if isinstance(values[0], str) else values[0].decode(errors="replace")
    if not text or len(text) > max_chars:
        raise error_for("malformed", None, f"caller id of {len(text)} characters")
    return text


class Servicer:
    """The Peer service's calls; a ``PeerServer`` serves them over gRPC, ``streams()`` over byte
    streams."""

    def __init__(
        self,
        config: ProtocolConfig,
        handler: ExchangeHandler,
        bucket: TokenBucket | None,
        faults: FaultPlan = NO_FAULTS,
    ) -> None:
        self.config = config
        self.limits = config.limits
        self.handler = handler
        self.bucket = bucket
        self.faults = faults
        self.busy = 0
        self._log = LogLimiter(log)
        self.inflight_bytes = 0
        self.stopping = False

    @contextlib.contextmanager
    def _slot(self, peer: str) -> Iterator[list[int]]:
        """One of ``max_concurrent_exchanges`` transfer slots; yields its byte reservation."""
        if self.stopping:
            raise PeerUnavailable(peer, "node is shutting down", reason="shutting_down")
        if self.busy >= self.config.max_concurrent_exchanges:
            raise PeerUnavailable(peer, f"{self.busy} transfers in flight (limit)", reason="busy")
        self.busy += 1
        reserved = [0]
        try:
            yield reserved
        finally:
            self.busy -= 1
            self.inflight_bytes -= reserved[0]

    def _deadline(self, context: Context) -> float:
        remaining = context.time_remaining()
        cap = self.config.call_timeout_s
        return cap if remaining is None else max(0.0, min(cap, remaining))

    async def _write(self, context: Context, frame: pb.Frame | bytes, peer: str) -> None:
        try:
            async with asyncio.timeout(self.config.frame_timeout_s):
                await context.write(frame)
        except TimeoutError:
            raise PeerUnavailable(peer, "caller stopped reading", reason="timeout") from None

    async def _send(self, context: Context, outgoing: Outgoing, peer: str) -> None:
        async for frame in outgoing_frames(
            outgoing,
            self.config.send_chunk_bytes,
            self.bucket,
            self.handler.on_transfer,
            faults=self.faults,
            peer=peer,
        ):
            await self._write(context, frame, peer)

    async def _drain(self, frames: TrackedFrames, peer: str) -> None:
        """After refusing mid-stream, read and drop what the sender still has in flight.

        Ending the call while the sender is still writing makes grpc.aio clients report INTERNAL
        instead of our status (grpc/grpc#36066), so we wait, within a byte and time budget, for
        the sender to see the reject frame and half-close.
        """
        budget = 4 * self.limits.max_chunk_bytes
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(2.0, self.config.frame_timeout_s)):
                while budget > 0:
                    raw = await frames.next_raw()  # not parsed: garbage drains like the rest
                    if raw is None:
                        return
                    budget -= max(_DRAIN_FRAME_COST, len(raw))

    def _note(self, exc: PeerError) -> str:
        """Count and log a refusal; return its wire reason."""
        reason = reason_of(exc)
        self.handler.on_reject(reason)
        self._log(reason, "refused a call from %s: %s", exc.peer, exc)
        return reason

    async def _abort(self, context: Context, reason: str, detail: str) -> None:
        await context.abort(
            status_of(reason),
            detail if detail.startswith(f"{reason}:") else f"{reason}: {detail}",
            trailing_metadata=((REASON_METADATA_KEY, reason),),
        )

    def _reserve(self, peer: str, reserved: list[int], num_bytes: int) -> None:
        """Count a payload against the node-wide budget before its buffer is allocated."""
        if self.inflight_bytes + num_bytes > self.limits.max_inflight_bytes:
            raise PeerUnavailable(
                peer, f"{self.inflight_bytes} bytes already in flight (limit)", reason="busy"
            )
        self.inflight_bytes += num_bytes
        reserved[0] += num_bytes

    async def _exchange(self, frames: TrackedFrames, context: Context, peer: str) -> None:
        with self._slot(peer) as reserved:
            first = await next_frame(frames, peer, self.config.frame_timeout_s)
            if first is None:
                raise truncated(peer, None)
            header, msg = check_first(
                first,
                peer=peer,
                limits=self.limits,
                view=self.handler.local_view(),
                max_bytes=self.limits.max_payload_bytes,
            )
            if header.sender_id != peer:
                raise error_for("malformed", peer, f"header names sender {header.sender_id!r}")
            outgoing = await self.handler.admit(peer, header)
            try:
                await self._swap(frames, context, peer, reserved, header, msg, outgoing)
            except BaseException as exc:
                reason = reason_of(exc) if isinstance(exc, PeerError) else "abandoned"
                self.handler.on_abandoned(peer, header, reason)
                raise

    async def _swap(
        self,
        frames: TrackedFrames,
        context: Context,
        peer: str,
        reserved: list[int],
        header: Header,
        msg: pb.Header,
        outgoing: Outgoing,
    ) -> None:
        """Send our payload while the dialler's arrives; then wait for its confirmation."""
        self._reserve(peer, reserved, msg.total_bytes)
        reader = PayloadReader(header, msg, peer=peer)
        await self._write(context, pb.Frame(reply=pb.Reply(accepted=True)), peer)
        sending = asyncio.ensure_future(self._send(context, outgoing, peer))
        try:
            received = await read_chunks(
                frames,
                reader,
                peer=peer,
                frame_timeout_s=self.config.frame_timeout_s,
                on_transfer=self.handler.on_transfer,
            )
            await sending
        finally:
            if not sending.done():
                sending.cancel()
                await asyncio.gather(sending, return_exceptions=True)
        confirmation = await next_frame(frames, peer, self.config.frame_timeout_s)
        if confirmation is None:
            raise truncated(peer, None)
        raise_if_refused(confirmation, peer)  # the dialler found our payload bad
        if confirmation.WhichOneof("body") != "reply":
            raise error_for("out_of_order", peer, "expected the dialler's confirmation")
        if await next_frame(frames, peer, self.config.frame_timeout_s) is not None:
            raise error_for("out_of_order", peer, "a frame after the confirmation")
        await self.handler.on_exchange(peer, received)

    async def Exchange(self, request_iterator: AsyncIterator[bytes], context: Context) -> None:
        frames = TrackedFrames(aiter(request_iterator))
        peer = "?"
        try:
            peer = frames.peer = peer_of(context, self.limits.max_name_chars)
            async with asyncio.timeout(self._deadline(context)):
                await self._exchange(frames, context, peer)
        except (PeerError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError):
                exc = PeerUnavailable(peer, "call deadline passed", reason="timeout")
            reason = self._note(exc)
            # The reply frame says why even where the status cannot get through (see _drain).
            with contextlib.suppress(Exception):
                await self._write(
                    context,
                    pb.Frame(
                        reply=pb.Reply(
                            accepted=False, reason=reason_code(reason), detail=exc.message
                        )
                    ),
                    peer,
                )
            if not frames.ended and reason != "timeout":
                await self._drain(frames, peer)
            await self._abort(context, reason, exc.message)
        except Exception:
            log.exception("Exchange from %s failed on our side", peer)
            self.handler.on_reject("internal")
            await self._abort(context, "internal", "internal error")

    def streams(self, peer_id: str | None = None) -> StreamServer:
        """Exchange calls over byte streams (the libp2p path), served by this servicer: the same
        slots, limits, validation and handler; with a secret, tokens aimed at ``peer_id``."""
        auth = self.config.auth
        return StreamServer(
            self.Exchange,
            fetch_state=self.FetchState,
            verifier=None if auth.secret is None else TokenVerifier(auth, peer_id),
            max_frame_bytes=self.limits.max_chunk_bytes,
            call_timeout_s=self.config.call_timeout_s,
            frame_timeout_s=self.config.frame_timeout_s,
            on_reject=self.handler.on_reject,
        )

    async def FetchState(self, request: pb.FetchStateRequest, context: Context) -> None:
        peer = "?"
        try:
            peer = peer_of(context, self.limits.max_name_chars)
            view = self.handler.local_view()
            if request.protocol_version != PROTOCOL_VERSION:
                raise error_for("version", peer, f"protocol version {request.protocol_version}")
            if request.run_id != view.run_id:
                raise error_for("wrong_run", peer, f"run {request.run_id[:64]!r}")
            async with asyncio.timeout(self._deadline(context)):
                with self._slot(peer):
                    outgoing = await self.handler.on_fetch_state(peer)
                    await self._send(context, outgoing, peer)
        except (PeerError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError):
                exc = PeerUnavailable(peer, "call deadline passed", reason="timeout")
            await self._abort(context, self._note(exc), exc.message)
        except Exception:
            log.exception("FetchState for %s failed on our side", peer)
            self.handler.on_reject("internal")
            await self._abort(context, "internal", "internal error")

    async def Status(self, request: pb.StatusRequest, context: Context) -> pb.StatusReply:
        return pb.StatusReply(**dataclasses.asdict(self.handler.status()))


def _method_handlers(servicer: Servicer) -> grpc.GenericRpcHandler:
    """The Peer service with a serializer that passes pre-serialised chunk frames through."""
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Exchange": grpc.stream_stream_rpc_method_handler(
                servicer.Exchange,
                request_deserializer=None,  # raw bytes: TrackedFrames parses each frame
                response_serializer=serialize,
            ),
            "FetchState": grpc.unary_stream_rpc_method_handler(
                servicer.FetchState,
                request_deserializer=pb.FetchStateRequest.FromString,
                response_serializer=serialize,
            ),
            "Status": grpc.unary_unary_rpc_method_handler(
                servicer.Status,
                request_deserializer=pb.StatusRequest.FromString,
                response_serializer=pb.StatusReply.SerializeToString,
            ),
        },
    )


@dataclass
class PeerServer:
    """A running server. Use ``async with PeerServer.start(config, handler) as server``."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    servicer: Servicer

    @classmethod
    @contextlib.asynccontextmanager
    async def start(
        cls,
        config: ProtocolConfig,
        handler: ExchangeHandler,
        *,
        bucket: TokenBucket | None = None,
        faults: FaultPlan = NO_FAULTS,
        peer_id: str | None = None,
        servicer: Servicer | None = None,
    ) -> AsyncIterator[PeerServer]:
        """Bind, serve, and on exit stop within ``config.shutdown_grace_s``.

        ``bucket`` caps what this node sends; give the server and the client the same one
        (``config.make_bucket()``) so the cap holds for the node as a whole. With ``peer_id``
        (a node's), a token must be aimed at that id (``auth.TokenVerifier``). ``servicer``:
        one the node also serves over byte streams (``Servicer.streams``), so both paths share
        its transfer slots and byte budget.
        """
        interceptors = []
        if config.auth.secret is not None:
            interceptors.append(
                AuthInterceptor(config.auth, on_reject=handler.on_reject, own_id=peer_id)
            )
        server = grpc.aio.server(
            interceptors=interceptors,
            options=config.server_options(),
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
            compression=grpc.Compression.NoCompression,  # gzip of float bytes: 19 MB/s (ops.md)
        )
        if servicer is None:
            servicer = Servicer(
                config, handler, bucket if bucket is not None else config.make_bucket(), faults
            )
        server.add_generic_rpc_handlers((_method_handlers(servicer),))
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
