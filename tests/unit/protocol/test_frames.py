"""Header checks and the payload reader, one test per rejection reason; no sockets."""

from __future__ import annotations

import mmap
import os
from typing import Any

import pytest
from google.protobuf.message import DecodeError

from locoswarm.errors import IncompatiblePeer, PeerError, PeerUnavailable, ProtocolViolation
from locoswarm.protocol import Header, Limits, LocalView, TensorSpec
from locoswarm.protocol._gen import locoswarm_pb2 as pb
from locoswarm.protocol.frames import (
    MAPPED_BYTES,
    ChunkView,
    PayloadReader,
    check_header,
    chunk_frame,
    encode_frames,
    frame_messages,
    parse_frame,
    receive_buffer,
)

LIMITS = Limits(max_payload_bytes=1 << 20, max_chunk_bytes=1 << 16, max_tensors=4)
VIEW = LocalView(run_id="r", model_fingerprint="f", outer_step=10)


def header(num_bytes: int = 1000, **kw: Any) -> Header:
    fields: dict[str, Any] = {
        "run_id": "r",
        "outer_step": 10,
        "strategy": "ef",
        "sender_id": "s",
        "model_fingerprint": "f",
        "tensors": (
            TensorSpec(
                name="a", codec="int8", dtype="float32", shape=(10, 10), num_bytes=num_bytes
            ),
        ),
    }
    fields.update(kw)
    return Header(**fields)


def frames(payload: bytes, chunk: int = 256, **kw: Any) -> list[pb.Frame]:
    return frame_messages(header(len(payload), **kw), payload, chunk)


def check(msg: pb.Header) -> Header:
    return check_header(msg, LIMITS, VIEW, peer="p", max_bytes=LIMITS.max_payload_bytes)


def read(fs: list[pb.Frame]) -> bytes:
    hdr = check(fs[0].header)
    reader = PayloadReader(hdr, fs[0].header, peer="p")
    for frame in fs[1:]:
        got = reader.feed(frame)
        if got is not None:
            return bytes(got.payload)
    raise AssertionError("no trailer")


def test_a_payload_survives_framing() -> None:
    payload = os.urandom(1000)
    fs = frames(payload)
    assert len(fs) == 1 + 4 + 1
    assert read(fs) == payload
    assert check(fs[0].header) == header(1000)


def test_encode_refuses_a_payload_that_does_not_match_its_header() -> None:
    with pytest.raises(ValueError, match="declares"):
        frame_messages(header(10), b"123", 4)


def _expect(reason: str, cls: type[PeerError], fn: Any, *args: Any) -> None:
    with pytest.raises(cls) as info:
        fn(*args)
    assert info.value.reason == reason
    assert info.value.peer == "p"


@pytest.mark.parametrize(
    ("field", "value", "reason", "cls"),
    [
        ("protocol_version", 2, "version", IncompatiblePeer),
        ("run_id", "other", "wrong_run", IncompatiblePeer),
        ("model_fingerprint", "g", "fingerprint", IncompatiblePeer),
        ("outer_step", 13, "stale_round", PeerUnavailable),
        ("outer_step", 7, "stale_round", PeerUnavailable),
        ("total_bytes", 1 << 30, "too_large", ProtocolViolation),
        ("chunk_bytes", 1 << 20, "too_large", ProtocolViolation),
        ("chunk_bytes", 0, "malformed", ProtocolViolation),
        ("num_chunks", 1 << 30, "too_many_chunks", ProtocolViolation),
        ("num_chunks", 3, "size_mismatch", ProtocolViolation),
        ("total_bytes", 999, "size_mismatch", ProtocolViolation),
        ("strategy", "x" * 300, "malformed", ProtocolViolation),
        ("tokens", (1 << 48) + 1, "malformed", ProtocolViolation),
    ],
)
def test_header_field_checks(field: str, value: object, reason: str, cls: type[PeerError]) -> None:
    msg = frames(os.urandom(1000))[0].header
    setattr(msg, field, value)
    _expect(reason, cls, check, msg)


def test_the_tokens_a_sender_trained_travel_in_the_header() -> None:
    assert check(frames(os.urandom(1000), tokens=5120)[0].header).tokens == 5120
    assert check(frames(os.urandom(1000))[0].header).tokens == 0  # not given


def test_header_lag_window_edges_pass() -> None:
    for step in (8, 12):
        check(frames(b"x" * 1000, outer_step=step)[0].header)


def test_tensor_spec_checks() -> None:
    msg = frames(os.urandom(1000))[0].header
    msg.tensors[0].codec = "zstd"
    _expect("unknown_codec", ProtocolViolation, check, msg)
    msg = frames(os.urandom(1000))[0].header
    msg.tensors[0].shape.extend([1] * 9)
    _expect("malformed", ProtocolViolation, check, msg)
    many = tuple(
        TensorSpec(name=str(i), codec="fp32", dtype="float32", shape=(1,), num_bytes=4)
        for i in range(5)
    )
    msg = frames(os.urandom(20), tensors=many)[0].header
    _expect("too_large", ProtocolViolation, check, msg)


def test_state_checks_skip_staleness() -> None:
    msg = frames(os.urandom(1000), outer_step=1)[0].header
    view = LocalView(run_id="r", model_fingerprint="f")
    assert check_header(msg, LIMITS, view, peer="p", max_bytes=1 << 20).outer_step == 1


def _mutated(mutate: Any) -> list[pb.Frame]:
    fs = frames(os.urandom(1000))
    return mutate(fs) or fs


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda fs: fs[1].chunk.__setattr__("data", b"\0" + fs[1].chunk.data[1:]), "bad_checksum"),
        (lambda fs: fs[1].chunk.__setattr__("index", 1), "out_of_order"),
        (lambda fs: fs[2].chunk.__setattr__("data", fs[2].chunk.data + b"!"), "chunk_too_large"),
        (lambda fs: fs[4].chunk.__setattr__("data", fs[4].chunk.data + b"!"), "size_mismatch"),
        (lambda fs: [*fs[:3], fs[-1]], "truncated"),
        (
            lambda fs: [*fs[:5], pb.Frame(chunk=pb.Chunk(index=4, data=b"")), fs[-1]],
            "too_many_chunks",
        ),
        (lambda fs: [fs[0], fs[0], *fs[1:]], "out_of_order"),
        (lambda fs: fs[-1].trailer.__setattr__("total_bytes", 5), "size_mismatch"),
    ],
)
def test_payload_reader_rejects(mutate: Any, reason: str) -> None:
    fs = _mutated(mutate)
    with pytest.raises(PeerError) as info:
        read(fs)
    assert info.value.reason == reason


def test_shape_and_codec_parameters_are_bounded() -> None:
    msg = frames(os.urandom(1000))[0].header
    msg.tensors[0].shape[:] = [2**63, 2**63]
    _expect("too_large", ProtocolViolation, check, msg)
    msg = frames(os.urandom(1000))[0].header
    msg.tensors[0].k_per_chunk = 101  # more kept values than the 100 elements
    _expect("malformed", ProtocolViolation, check, msg)


def test_an_empty_payload_declares_no_chunks() -> None:
    msg = frames(b"", tensors=())[0].header
    assert check(msg).total_bytes == 0
    msg.num_chunks = 100_000
    _expect("size_mismatch", ProtocolViolation, check, msg)


@pytest.mark.parametrize("index", [0, 1, 127, 128, 300, 2**31])
@pytest.mark.parametrize("size", [0, 1, 127, 128, 70_000])
def test_hand_serialised_chunk_frames_are_protobuf_wire_format(index: int, size: int) -> None:
    data = os.urandom(size)
    wire = chunk_frame(index, memoryview(data))
    parsed = pb.Frame.FromString(wire)
    assert (parsed.chunk.index, parsed.chunk.data) == (index, data)
    expected = pb.Frame(chunk=pb.Chunk(index=index, data=data)).SerializeToString()
    if index and size:  # protobuf leaves out zero fields; ours writes them, which parses the same
        assert wire == expected


@pytest.mark.parametrize("index", [0, 1, 127, 128, 2**32 - 1])
@pytest.mark.parametrize("size", [0, 1, 300])
def test_chunk_frames_are_read_in_place_as_protobuf_reads_them(index: int, size: int) -> None:
    data = os.urandom(size)
    for wire in (
        chunk_frame(index, memoryview(data)),  # ours: every field written
        pb.Frame(chunk=pb.Chunk(index=index, data=data)).SerializeToString(),  # zeros left out
    ):
        frame = parse_frame(wire)
        assert isinstance(frame, ChunkView)
        assert frame.WhichOneof("body") == "chunk"
        assert (frame.chunk.index, bytes(frame.chunk.data)) == (index, data)
        assert frame.data.obj is wire  # a view of the frame's bytes, not a copy


@pytest.mark.parametrize(
    "wire",
    [
        b"\x12\x05\x08\x01\x12\x01a\x08\x02",  # a repeated field: protobuf's last-one-wins
        b"\x12\x04\x08\x01\x18\x05",  # an unknown field
        b"\x12\x08\x08\x80\x80\x80\x80\x10\x12\x00",  # an index past uint32
        pb.Frame(header=pb.Header(run_id="r")).SerializeToString(),
        pb.Frame(reply=pb.Reply(accepted=True)).SerializeToString(),
    ],
)
def test_other_frames_are_read_by_protobuf(wire: bytes) -> None:
    frame = parse_frame(wire)
    assert isinstance(frame, pb.Frame)
    assert frame == pb.Frame.FromString(wire)


@pytest.mark.parametrize(
    "wire",
    [
        b"\x12\x09\x08\x01\x12\x05ab",  # a data length past the end
        b"\x12\x03\x08\x01",  # a frame length past the end
        b"\x12\x82",  # a varint that runs off the end
        b"\x12\x02\x08\xff",
    ],
)
def test_garbage_that_looks_like_a_chunk_is_refused_as_protobuf_refuses_it(wire: bytes) -> None:
    with pytest.raises(DecodeError):
        pb.Frame.FromString(wire)
    with pytest.raises(DecodeError):
        parse_frame(wire)


@pytest.mark.parametrize("total", [10, MAPPED_BYTES + 3])
def test_chunks_are_written_into_one_buffer_as_they_arrive(total: int) -> None:
    data = os.urandom(total)
    wires = [
        f if isinstance(f, bytes) else f.SerializeToString()
        for f, _ in encode_frames(header(total), data, 4096)
    ]
    first = pb.Frame.FromString(wires[0])
    reader = PayloadReader(header(total), first.header, peer="p")
    assert len(reader.buffer) == total  # allocated once the header was checked
    received = None
    for wire in wires[1:]:
        received = reader.feed(parse_frame(wire))
    assert received is not None
    assert received.payload is reader.buffer  # no join: the chunks were copied into place
    assert bytes(received.payload) == data
    assert isinstance(received.payload, mmap.mmap if total >= MAPPED_BYTES else bytearray)
    memoryview(received.payload)[0] = 0  # writable: decoders may read in place


@pytest.mark.parametrize("sizes", [(1000,), (256, 744), (100, 100, 800), (0, 999, 1), (1, 1, 998)])
def test_a_payload_in_parts_is_framed_as_if_joined(sizes: tuple[int, ...]) -> None:
    data = os.urandom(sum(sizes))
    parts, at = [], 0
    for size in sizes:
        parts.append(memoryview(data)[at : at + size])
        at += size
    joined = frames(data)
    split = frame_messages(header(len(data)), tuple(parts), 256)
    assert [f.SerializeToString() for f in split] == [f.SerializeToString() for f in joined]
    assert read(split) == data


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_large_receive_buffer_is_private_memory() -> None:
    # A private mapping (not mmap's default shared one, which is shmem and slower to fault in):
    # a forked child's write stays in the child.
    buffer = receive_buffer(MAPPED_BYTES)
    assert isinstance(buffer, mmap.mmap)
    buffer[:4] = b"ours"
    pid = os.fork()
    if pid == 0:  # the child: write, and leave at once whatever happens
        code = 1
        try:
            buffer[:4] = b"kids"
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert buffer[:4] == b"ours"
