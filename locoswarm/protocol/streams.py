"""Reading and writing one framed payload over a gRPC stream, shared by server and client.

Every wait is bounded: ``next_frame`` by the per-frame progress timeout, the whole call by its
deadline (the callers wrap it). Sending draws on the node's upload bucket.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

from google.protobuf.message import DecodeError

from locoswarm.errors import PeerUnavailable
from locoswarm.faultplan import NO_FAULTS, Fault, FaultPlan
from locoswarm.protocol._gen import locoswarm_pb2 as pb
from locoswarm.protocol.config import Limits
from locoswarm.protocol.frames import (
    ChunkView,
    Header,
    InFrame,
    LocalView,
    OutFrame,
    PayloadReader,
    Received,
    check_header,
    encode_frames,
    expect_header,
    parse_frame,
    truncated,
)
from locoswarm.protocol.handler import Outgoing
from locoswarm.protocol.ratelimit import TokenBucket
from locoswarm.protocol.reasons import error_for, reason_name

OnTransfer = Callable[[str, int], None]


async def next_frame(
    frames: AsyncIterator[InFrame], peer: str | None, timeout_s: float | None
) -> InFrame | None:
    """The next frame, None at the end of the stream; a stall past ``timeout_s`` is a timeout."""
    try:
        async with asyncio.timeout(timeout_s):
            return await anext(frames)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise PeerUnavailable(peer, f"no frame for {timeout_s:.1f}s", reason="timeout") from None


def raise_if_refused(frame: InFrame, peer: str | None) -> None:
    """A reject reply may come at any point of a stream; it ends the call with its reason."""
    if isinstance(frame, ChunkView):
        return
    if frame.WhichOneof("body") == "reply" and not frame.reply.accepted:
        raise error_for(reason_name(frame.reply.reason), peer, frame.reply.detail)


async def outgoing_frames(
    outgoing: Outgoing,
    chunk_bytes: int,
    bucket: TokenBucket | None,
    on_transfer: OnTransfer,
    *,
    faults: FaultPlan = NO_FAULTS,
    peer: str | None = None,
    before_payload: Callable[[], Awaitable[bool]] | None = None,
) -> AsyncIterator[OutFrame]:
    """Header, chunks and trailer of ``outgoing``; each chunk waits for the upload bucket.

    ``faults`` is the test seam: a plan may drop, delay, corrupt or stall a chunk, end the
    stream early, or kill this process mid-stream.
    """
    frames = encode_frames(outgoing.header, outgoing.payload, chunk_bytes)
    yield next(frames)[0]  # the header
    if before_payload is not None and not await before_payload():
        return  # e.g. the peer refused the header: no chunk is even built
    index = 0
    for frame, size in frames:
        if size:
            fault = faults.fire(
                "send_chunk", peer=peer, outer_step=outgoing.header.outer_step, chunk=index
            )
            index += 1
            if fault is not None:
                action = await _inject(fault, frame)
                if action == "skip":
                    continue
                if action == "end":
                    return
                if isinstance(action, bytes):
                    frame = action
            if bucket is not None:
                await bucket.take(size)
            on_transfer("sent", size)
        yield frame


async def _inject(fault: Fault, frame: OutFrame) -> str | bytes | None:
    """Apply one fault to a chunk frame: "skip" it, "end" the stream, or new frame bytes."""
    if fault.action in ("delay", "stall"):
        await asyncio.sleep(fault.seconds)
        return None
    if fault.action == "drop":
        return "skip"
    if fault.action == "truncate":
        return "end"
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault.action == "corrupt" and isinstance(frame, bytes) and frame:
        return frame[:-1] + bytes([frame[-1] ^ 0xFF])  # the last byte is payload data
    return None


def check_first(
    first: InFrame, *, peer: str | None, limits: Limits, view: LocalView, max_bytes: int
) -> tuple[Header, pb.Header]:
    """Check the first frame of a payload as its header (a reject reply ends the call)."""
    raise_if_refused(first, peer)
    msg = expect_header(first, peer=peer)
    return check_header(msg, limits, view, peer=peer, max_bytes=max_bytes), msg


async def read_chunks(
    frames: AsyncIterator[InFrame],
    reader: PayloadReader,
    *,
    peer: str | None,
    frame_timeout_s: float,
    on_transfer: OnTransfer,
) -> Received:
    """Feed chunks to ``reader`` up to the trailer; return the complete, checked payload."""
    while True:
        frame = await next_frame(frames, peer, frame_timeout_s)
        if frame is None:
            raise truncated(peer, reader)
        raise_if_refused(frame, peer)
        before = reader.offset
        received = reader.feed(frame)
        if reader.offset > before:
            on_transfer("received", reader.offset - before)
        if received is not None:
            return received


class TrackedFrames:
    """An async iterator of frames that remembers whether the sender half-closed, and turns a
    frame that does not parse into a refusal (the sender's fault, not ours)."""

    def __init__(self, frames: AsyncIterator[bytes]) -> None:
        self.frames = frames
        self.ended = False
        self.peer = "?"

    def __aiter__(self) -> TrackedFrames:
        return self

    async def next_raw(self) -> bytes | None:
        """The next frame's bytes, unparsed; None at the end of the stream."""
        try:
            return await anext(self.frames)
        except StopAsyncIteration:
            self.ended = True
            return None

    async def __anext__(self) -> InFrame:
        try:
            raw = await anext(self.frames)
        except StopAsyncIteration:
            self.ended = True
            raise
        try:  # parsed here, not by grpc: a bad frame is a refusal with our status
            frame = parse_frame(raw)
        except DecodeError:
            raise error_for("malformed", self.peer, "a frame that is not a Frame") from None
        return frame
