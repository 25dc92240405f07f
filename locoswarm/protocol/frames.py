"""Framing of one payload: header, chunks, trailer; and the checks a receiver makes on each.

A payload is a run of bytes described by ``TensorSpec`` entries. This module turns a header and
payload into ``Frame`` messages, and checks incoming frames one at a time against ``Limits``
*before* it allocates the payload buffer. It knows bytes and names, not tensors or codecs.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass

from zlib_ng import zlib_ng

from locoswarm.errors import ProtocolViolation
from locoswarm.protocol._gen import locoswarm_pb2 as pb
from locoswarm.protocol.config import PROTOCOL_VERSION, Limits
from locoswarm.protocol.reasons import error_for

Buffer = bytes | bytearray | memoryview | mmap.mmap
Payload = Buffer | tuple[Buffer, ...]
"""What is sent: one buffer, or several sent back to back as one payload (never joined)."""


def payload_size(payload: Payload) -> int:
    if isinstance(payload, tuple):
        return sum(memoryview(p).nbytes for p in payload)
    return memoryview(payload).nbytes


def payload_bytes(payload: Payload) -> bytes:
    """The payload as one ``bytes`` (a copy: for tests and fault injection, not the hot path)."""
    if isinstance(payload, tuple):
        return b"".join(payload)
    return bytes(payload)


def _pieces(payload: Payload, chunk_bytes: int) -> Iterator[memoryview | bytes]:
    """The payload in pieces of ``chunk_bytes`` (the last may be shorter): views of its buffers,
    copied only where a piece straddles two of them."""
    buffers = payload if isinstance(payload, tuple) else (payload,)
    carry = bytearray()
    for buffer in buffers:
        view = memoryview(buffer).cast("B")
        start = 0
        if carry:
            take = min(chunk_bytes - len(carry), len(view))
            carry += view[:take]
            start = take
            if len(carry) < chunk_bytes:
                continue
            yield bytes(carry)
            carry = bytearray()
        end = start + (len(view) - start) // chunk_bytes * chunk_bytes
        for at in range(start, end, chunk_bytes):
            yield view[at : at + chunk_bytes]
        carry += view[end:]
    if carry:
        yield bytes(carry)


MAX_MEMBERS = 64
"""Most members a group header may list."""
MAX_TOKENS = 1 << 48
"""Most tokens a header may claim for one round (a float64 holds every count up to it)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorSpec:
    """One tensor's slice of a payload, as the sender's compression layer wrote it."""

    name: str
    codec: str
    dtype: str
    shape: tuple[int, ...]
    num_bytes: int
    block_size: int = 0
    k_per_chunk: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class Header:
    """What a payload is and who sent it. ``total_bytes`` is the sum of the specs' byte counts."""

    run_id: str
    outer_step: int
    strategy: str
    sender_id: str
    model_fingerprint: str
    tensors: tuple[TensorSpec, ...] = ()
    kind: str = ""
    members: tuple[str, ...] = ()
    """Group exchanges: the group's members in order ("peer_id@host:port")."""
    tokens: int = 0
    """Tokens the sender trained in this message's round (0: not given); groups weight by it."""
    protocol_version: int = PROTOCOL_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(spec.num_bytes for spec in self.tensors)


@dataclass(frozen=True, kw_only=True, slots=True)
class LocalView:
    """What the receiving node expects of a header: its run, model and outer step."""

    run_id: str
    model_fingerprint: str
    outer_step: int | None = None
    """Our outer step, or None to skip the staleness check (state transfer)."""


class Received:
    """A complete payload that passed every check, in the one buffer its chunks were written
    into as they arrived (writable, and for large payloads page-aligned: decoders may read
    tensors straight out of it)."""

    __slots__ = ("header", "payload")

    def __init__(self, header: Header, payload: Buffer) -> None:
        self.header = header
        self.payload: Buffer = payload

    @property
    def num_bytes(self) -> int:
        return memoryview(self.payload).nbytes

    def __repr__(self) -> str:
        return f"Received(header={self.header!r}, {self.num_bytes} bytes)"


MAPPED_BYTES = 1 << 20
"""Payloads of at least this many bytes are received into an anonymous memory mapping."""


_PRIVATE = (
    mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS")
    else 0
)


def receive_buffer(total: int) -> bytearray | mmap.mmap:
    """The buffer a payload of ``total`` bytes is received into. A large one is a private
    anonymous mapping: page-aligned, and its pages are committed only as chunks land in them (a
    ``bytearray`` is zero-filled first, a pass over the whole payload before any byte arrives).
    Private, not ``mmap``'s default shared mapping: shared anonymous pages are shmem, slower to
    fault in (measured in docs/BENCHMARKS.md). Freed when the last reference to it (or to a
    tensor read out of it) goes."""
    if total < MAPPED_BYTES:
        return bytearray(total)
    return mmap.mmap(-1, total, flags=_PRIVATE) if _PRIVATE else mmap.mmap(-1, total)


def header_to_pb(header: Header, chunk_bytes: int) -> pb.Header:
    total = header.total_bytes
    return pb.Header(
        protocol_version=header.protocol_version,
        run_id=header.run_id,
        outer_step=header.outer_step,
        strategy=header.strategy,
        sender_id=header.sender_id,
        model_fingerprint=header.model_fingerprint,
        tensors=[
            pb.TensorSpec(
                name=s.name,
                codec=s.codec,
                dtype=s.dtype,
                shape=list(s.shape),
                num_bytes=s.num_bytes,
                block_size=s.block_size,
                k_per_chunk=s.k_per_chunk,
            )
            for s in header.tensors
        ],
        total_bytes=total,
        chunk_bytes=chunk_bytes,
        num_chunks=-(-total // chunk_bytes),
        kind=header.kind,
        members=list(header.members),
        tokens=header.tokens,
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def chunk_frame(index: int, data: memoryview | bytes) -> bytes:
    """``Frame(chunk=Chunk(index, data)).SerializeToString()``, built with one copy of ``data``.

    Protobuf would copy a chunk three times on the way out (slice, message, serialisation); this
    writes the same wire bytes directly (pinned by a unit test against protobuf's encoder).
    """
    inner_head = b"\x08" + _varint(index) + b"\x12" + _varint(len(data))
    inner_len = len(inner_head) + len(data)
    return b"".join((b"\x12", _varint(inner_len), inner_head, data))


OutFrame = pb.Frame | bytes
"""A frame to send: a message, or a chunk frame already serialised by ``chunk_frame``."""


def serialize(frame: OutFrame) -> bytes:
    """gRPC serializer for outgoing frames (pre-serialised chunk frames pass through)."""
    return frame if isinstance(frame, bytes) else frame.SerializeToString()


@dataclass(frozen=True, slots=True)
class ChunkView:
    """A chunk frame read without protobuf: its index and a view of its data inside the frame's
    own bytes. It answers ``WhichOneof("body")`` and ``.chunk`` like the ``pb.Frame`` it stands
    for, so readers treat both alike."""

    index: int
    data: memoryview

    def WhichOneof(self, _group: str) -> str:  # protobuf's name for it
        return "chunk"

    @property
    def chunk(self) -> ChunkView:
        return self


InFrame = pb.Frame | ChunkView
"""A received frame: a parsed message, or a chunk read in place."""


def _read_varint(view: memoryview, at: int) -> tuple[int, int] | None:
    """(value, position after it) of the varint at ``at``; None if it runs off the end or past
    ten bytes."""
    value = shift = 0
    while at < len(view) and shift < 70:
        byte = view[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
    return None


def _chunk_view(view: memoryview) -> ChunkView | None:
    """``view`` as a ``ChunkView`` when it is exactly one chunk field holding at most one index
    (below 2**32) and one data field, each once; None for any other form (protobuf reads those)."""
    got = _read_varint(view, 1)
    if got is None or got[1] + got[0] != len(view):
        return None
    at, index, data, seen = got[1], 0, view[0:0], set()
    while at < len(view):
        tag = view[at]
        if tag in seen or tag not in (0x08, 0x12):
            return None
        seen.add(tag)
        got = _read_varint(view, at + 1)
        if got is None:
            return None
        value, at = got
        if tag == 0x08:
            if value >= 1 << 32:
                return None
            index = value
        else:
            if at + value > len(view):
                return None
            data, at = view[at : at + value], at + value
    return ChunkView(index, data)


def parse_frame(raw: bytes) -> InFrame:
    """A received frame. A chunk frame (nearly all of a payload's bytes) in its plain form is
    read in place: protobuf would copy its data twice. Anything else goes through protobuf,
    which raises ``DecodeError`` for bytes that are not a ``Frame``."""
    view = memoryview(raw)
    if len(view) > 1 and view[0] == 0x12:
        chunk = _chunk_view(view)
        if chunk is not None:
            return chunk
    frame: pb.Frame = pb.Frame.FromString(raw)
    return frame


def encode_frames(
    header: Header, payload: Payload, chunk_bytes: int
) -> Iterator[tuple[OutFrame, int]]:
    """Frames for one payload with their chunk sizes: header, chunks of at most ``chunk_bytes``
    (already serialised), trailer with the CRC-32. The size is 0 for header and trailer. A
    payload of several buffers is framed as if they were one: the same chunks, never joined."""
    total = payload_size(payload)
    if total != header.total_bytes:
        raise ValueError(f"payload has {total} bytes, header declares {header.total_bytes}")
    yield pb.Frame(header=header_to_pb(header, chunk_bytes)), 0
    crc = 0
    index = 0
    for data in _pieces(payload, chunk_bytes):
        crc = zlib_ng.crc32(data, crc)
        yield chunk_frame(index, data), len(data)
        index += 1
    yield pb.Frame(trailer=pb.Trailer(total_bytes=total, num_chunks=index, crc32=crc)), 0


def frame_messages(header: Header, payload: Payload, chunk_bytes: int) -> list[pb.Frame]:
    """``encode_frames`` as parsed messages (for inspection and tests)."""
    return [
        frame if isinstance(frame, pb.Frame) else pb.Frame.FromString(frame)
        for frame, _ in encode_frames(header, payload, chunk_bytes)
    ]


def _check_name(value: str, what: str, limits: Limits, peer: str | None) -> None:
    if len(value) > limits.max_name_chars:
        raise error_for(
            "malformed", peer, f"{what} is {len(value)} chars, limit {limits.max_name_chars}"
        )


def check_header(
    msg: pb.Header, limits: Limits, view: LocalView, *, peer: str | None, max_bytes: int
) -> Header:
    """Validate a received header before anything is allocated; return it as a ``Header``.

    Raises the ``PeerError`` subclass for the first problem found, with its wire reason.
    """
    if msg.protocol_version != PROTOCOL_VERSION:
        raise error_for(
            "version", peer, f"protocol version {msg.protocol_version}, ours {PROTOCOL_VERSION}"
        )
    for what in ("run_id", "strategy", "sender_id", "model_fingerprint", "kind"):
        _check_name(getattr(msg, what), what, limits, peer)
    if msg.run_id != view.run_id:
        raise error_for("wrong_run", peer, f"run {msg.run_id!r}, ours {view.run_id!r}")
    if msg.model_fingerprint != view.model_fingerprint:
        raise error_for(
            "fingerprint",
            peer,
            f"model fingerprint {msg.model_fingerprint!r}, ours {view.model_fingerprint!r}",
        )
    if view.outer_step is not None and abs(msg.outer_step - view.outer_step) > limits.max_lag:
        raise error_for(
            "stale_round",
            peer,
            f"outer step {msg.outer_step}, ours {view.outer_step} (lag window {limits.max_lag})",
        )
    if len(msg.tensors) > limits.max_tensors:
        raise error_for(
            "too_large", peer, f"{len(msg.tensors)} tensors, limit {limits.max_tensors}"
        )
    if msg.total_bytes > max_bytes:
        raise error_for("too_large", peer, f"declared {msg.total_bytes} bytes, limit {max_bytes}")
    if msg.chunk_bytes > limits.max_chunk_bytes:
        raise error_for(
            "too_large", peer, f"chunk size {msg.chunk_bytes}, limit {limits.max_chunk_bytes}"
        )
    if msg.total_bytes > 0 and msg.chunk_bytes == 0:
        raise error_for("malformed", peer, "chunk_bytes is 0 for a non-empty payload")
    if msg.num_chunks > limits.max_chunks:
        raise error_for(
            "too_many_chunks", peer, f"{msg.num_chunks} chunks, limit {limits.max_chunks}"
        )
    if msg.num_chunks != (-(-msg.total_bytes // msg.chunk_bytes) if msg.total_bytes else 0):
        raise error_for(
            "size_mismatch",
            peer,
            f"{msg.num_chunks} chunks of {msg.chunk_bytes} bytes cannot carry {msg.total_bytes}",
        )
    if msg.tokens > MAX_TOKENS:
        raise error_for("malformed", peer, f"{msg.tokens} tokens in a round, limit {MAX_TOKENS}")
    if len(msg.members) > MAX_MEMBERS:
        raise error_for("malformed", peer, f"{len(msg.members)} group members, limit {MAX_MEMBERS}")
    for member in msg.members:
        _check_name(member, "group member", limits, peer)
    specs = []
    for spec in msg.tensors:
        _check_name(spec.name, "tensor name", limits, peer)
        if spec.codec not in limits.allowed_codecs:
            raise error_for(
                "unknown_codec", peer, f"tensor {spec.name!r}: codec {spec.codec[:32]!r}"
            )
        _check_name(spec.dtype, "dtype", limits, peer)
        if len(spec.shape) > limits.max_ndim:
            raise error_for("malformed", peer, f"tensor {spec.name!r} has {len(spec.shape)} dims")
        elements = 1
        for dim in spec.shape:
            elements *= dim
        if elements > limits.max_elements:
            raise error_for("too_large", peer, f"tensor {spec.name!r} declares {elements} elements")
        if spec.k_per_chunk > elements or spec.block_size > limits.max_chunk_bytes:
            raise error_for(
                "malformed",
                peer,
                f"tensor {spec.name!r}: block_size {spec.block_size}, k_per_chunk "
                f"{spec.k_per_chunk} for {elements} elements",
            )
        specs.append(
            TensorSpec(
                name=spec.name,
                codec=spec.codec,
                dtype=spec.dtype,
                shape=tuple(spec.shape),
                num_bytes=spec.num_bytes,
                block_size=spec.block_size,
                k_per_chunk=spec.k_per_chunk,
            )
        )
    declared = sum(s.num_bytes for s in specs)
    if declared != msg.total_bytes:
        raise error_for(
            "size_mismatch",
            peer,
            f"tensor byte counts add up to {declared}, header declares {msg.total_bytes}",
        )
    return Header(
        run_id=msg.run_id,
        outer_step=msg.outer_step,
        strategy=msg.strategy,
        sender_id=msg.sender_id,
        model_fingerprint=msg.model_fingerprint,
        tensors=tuple(specs),
        kind=msg.kind,
        members=tuple(msg.members),
        tokens=msg.tokens,
        protocol_version=msg.protocol_version,
    )


class PayloadReader:
    """Checks one payload's frames in order and assembles the bytes.

    Feed it the frames after ``header`` has been checked; ``feed`` returns the ``Received``
    payload when the trailer has arrived and matched, ``None`` before that.
    """

    def __init__(self, header: Header, msg: pb.Header, *, peer: str | None) -> None:
        self.header = header
        self.peer = peer
        self.chunk_bytes = msg.chunk_bytes
        self.num_chunks = msg.num_chunks
        self.total = msg.total_bytes
        self.buffer = receive_buffer(self.total)  # after the header's checks and reservation
        self.view = memoryview(self.buffer)
        self.offset = 0
        self.index = 0
        self.crc = 0

    def feed(self, frame: InFrame) -> Received | None:
        if isinstance(frame, ChunkView):
            self._chunk(frame)
            return None
        body = frame.WhichOneof("body")
        if body == "chunk":
            self._chunk(frame.chunk)
            return None
        if body == "trailer":
            return self._trailer(frame.trailer)
        raise error_for("out_of_order", self.peer, f"a {body or 'empty'} frame inside a payload")

    def _chunk(self, chunk: pb.Chunk | ChunkView) -> None:
        if chunk.index != self.index:
            raise error_for(
                "out_of_order", self.peer, f"chunk {chunk.index}, expected {self.index}"
            )
        if self.index >= self.num_chunks:
            raise error_for(
                "too_many_chunks", self.peer, f"chunk {chunk.index} of {self.num_chunks} declared"
            )
        data = chunk.data  # a ChunkView's is a view; a message's is copied on each read
        size = len(data)
        if size > self.chunk_bytes:
            raise error_for(
                "chunk_too_large", self.peer, f"chunk of {size} bytes, declared {self.chunk_bytes}"
            )
        if self.offset + size > self.total:
            raise error_for(
                "size_mismatch", self.peer, f"{self.offset + size} bytes, declared {self.total}"
            )
        self.view[self.offset : self.offset + size] = data  # the one copy, into its place
        self.crc = zlib_ng.crc32(data, self.crc)
        self.offset += size
        self.index += 1

    def _trailer(self, trailer: pb.Trailer) -> Received:
        if self.offset != self.total or self.index != self.num_chunks:
            raise error_for(
                "truncated",
                self.peer,
                f"trailer after {self.offset} of {self.total} bytes, "
                f"{self.index} of {self.num_chunks} chunks",
            )
        if trailer.total_bytes != self.total or trailer.num_chunks != self.num_chunks:
            raise error_for(
                "size_mismatch",
                self.peer,
                f"trailer declares {trailer.total_bytes} bytes in {trailer.num_chunks} chunks",
            )
        if trailer.crc32 != self.crc:
            raise error_for(
                "bad_checksum", self.peer, f"crc32 {trailer.crc32:08x}, computed {self.crc:08x}"
            )
        self.view.release()
        return Received(self.header, self.buffer)


def expect_header(frame: InFrame, *, peer: str | None) -> pb.Header:
    """The header of a frame that must be one."""
    body = frame.WhichOneof("body")
    if isinstance(frame, ChunkView) or body != "header":
        raise error_for("out_of_order", peer, f"expected a header, got a {body or 'empty'} frame")
    return frame.header


def truncated(peer: str | None, reader: PayloadReader | None) -> ProtocolViolation:
    """The error for a stream that ended before its payload was complete."""
    where = (
        "before the header"
        if reader is None
        else (f"after {reader.offset} of {reader.total} bytes")
    )
    return ProtocolViolation(peer, f"truncated: stream ended {where}", reason="truncated")
