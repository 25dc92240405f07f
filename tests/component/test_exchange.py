"""Exchange, FetchState and Status over real grpc.aio on 127.0.0.1: good calls and every refusal."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import zlib
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
import pytest

from locoswarm.errors import IncompatiblePeer, PeerError, PeerUnavailable, ProtocolViolation
from locoswarm.protocol import (
    LocalView,
    Outgoing,
    PeerClient,
    PeerServer,
    ProtocolConfig,
    Received,
    TokenBucket,
)
from locoswarm.protocol._gen import locoswarm_pb2 as pb
from locoswarm.protocol._gen import locoswarm_pb2_grpc as pb_grpc
from locoswarm.protocol.frames import frame_messages
from locoswarm.protocol.reasons import REASON_METADATA_KEY, reason_name
from tests.component.conftest import (
    FINGERPRINT,
    REPLY,
    RUN,
    RecordingHandler,
    dialling,
    make_header,
    serving,
)

VIEW = LocalView(run_id=RUN, model_fingerprint=FINGERPRINT, outer_step=5)


async def test_exchange_round_trips_bit_exact(small_chunks: ProtocolConfig, payload: bytes) -> None:
    async with serving(small_chunks) as (address, handler), dialling(small_chunks) as client:
        got = await client.exchange(
            address, Outgoing(make_header(len(payload)), payload), view=VIEW
        )
        assert bytes(got.payload) == REPLY(len(payload))
        assert got.header.sender_id == "server"
        assert got.header.tensors[0].num_bytes == len(payload)
        (seen,) = handler.exchanges
        assert bytes(seen.payload) == payload
        assert seen.header == make_header(len(payload))
        assert handler.bytes == {"sent": len(payload), "received": len(payload)}


async def test_empty_payload_round_trips(small_chunks: ProtocolConfig) -> None:
    async with serving(small_chunks) as (address, _), dialling(small_chunks) as client:
        got = await client.exchange(address, Outgoing(make_header(0), b""), view=VIEW)
        assert bytes(got.payload) == b""


def _frames(payload: bytes, chunk: int = 64 << 10, **header_kw: Any) -> list[pb.Frame]:
    return frame_messages(make_header(len(payload), **header_kw), payload, chunk)


async def _send_raw(
    address: str, frames: Iterable[pb.Frame], *, stall_s: float = 0.0
) -> tuple[grpc.StatusCode, str, str]:
    """Send hand-made frames; return (status, reason from trailing metadata, reply-frame reason)."""

    async def requests() -> AsyncIterator[pb.Frame]:
        for frame in frames:
            yield frame
        if stall_s:
            await asyncio.sleep(stall_s)

    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.PeerStub(channel).Exchange(
            requests(), timeout=20, metadata=(("locoswarm-peer", "client"),)
        )
        reply_reason = ""
        try:
            async for frame in call:
                if frame.WhichOneof("body") == "reply" and not frame.reply.accepted:
                    reply_reason = reason_name(frame.reply.reason)
        except grpc.aio.AioRpcError as err:
            trailing = dict(err.trailing_metadata() or ())

            return err.code(), str(trailing.get(REASON_METADATA_KEY, "")), reply_reason
        return grpc.StatusCode.OK, "", reply_reason


def _corrupt_chunk(frames: list[pb.Frame]) -> list[pb.Frame]:
    data = bytearray(frames[1].chunk.data)
    data[7] ^= 0xFF
    frames[1].chunk.data = bytes(data)
    return frames


def _swap_chunks(frames: list[pb.Frame]) -> list[pb.Frame]:
    frames[1], frames[2] = frames[2], frames[1]
    return frames


def _oversized_chunk(frames: list[pb.Frame]) -> list[pb.Frame]:
    frames[1].chunk.data += b"x"
    return frames


def _extra_bytes(frames: list[pb.Frame]) -> list[pb.Frame]:
    last = frames[-2].chunk
    last.data = last.data[:-1]  # last chunk one byte short, then one more chunk than declared
    return [*frames[:-1], pb.Frame(chunk=pb.Chunk(index=last.index + 1, data=b"xy")), frames[-1]]


def _spec_sum_wrong(frames: list[pb.Frame]) -> list[pb.Frame]:
    frames[0].header.tensors[0].num_bytes += 4
    return frames


def _declare_huge(frames: list[pb.Frame]) -> list[pb.Frame]:
    frames[0].header.tensors[0].num_bytes = 1 << 40
    frames[0].header.total_bytes = 1 << 40
    frames[0].header.num_chunks = (1 << 40) // frames[0].header.chunk_bytes
    return frames


def _too_many_chunks(frames: list[pb.Frame]) -> list[pb.Frame]:
    frames[0].header.num_chunks = 1 << 31
    return frames


def _truncate(frames: list[pb.Frame]) -> list[pb.Frame]:
    return frames[:3]


def _trailer_early(frames: list[pb.Frame]) -> list[pb.Frame]:
    return [*frames[:3], frames[-1]]


def _chunk_first(frames: list[pb.Frame]) -> list[pb.Frame]:
    return frames[1:]


def _second_header(frames: list[pb.Frame]) -> list[pb.Frame]:
    return [frames[0], frames[0], *frames[1:]]


def _codec(frames: list[pb.Frame]) -> list[pb.Frame]:
    frames[0].header.tensors[0].codec = "gzip-of-doom"
    return frames


def _field(name: str, value: object) -> Callable[[list[pb.Frame]], list[pb.Frame]]:
    def mutate(frames: list[pb.Frame]) -> list[pb.Frame]:
        setattr(frames[0].header, name, value)
        return frames

    return mutate


MALFORMED = [
    ("bad_checksum", _corrupt_chunk, grpc.StatusCode.INVALID_ARGUMENT),
    ("out_of_order", _swap_chunks, grpc.StatusCode.INVALID_ARGUMENT),
    ("out_of_order", _chunk_first, grpc.StatusCode.INVALID_ARGUMENT),
    ("out_of_order", _second_header, grpc.StatusCode.INVALID_ARGUMENT),
    ("chunk_too_large", _oversized_chunk, grpc.StatusCode.INVALID_ARGUMENT),
    ("too_many_chunks", _extra_bytes, grpc.StatusCode.INVALID_ARGUMENT),
    ("size_mismatch", _spec_sum_wrong, grpc.StatusCode.INVALID_ARGUMENT),
    ("too_large", _declare_huge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("too_many_chunks", _too_many_chunks, grpc.StatusCode.INVALID_ARGUMENT),
    ("truncated", _truncate, grpc.StatusCode.INVALID_ARGUMENT),
    ("truncated", _trailer_early, grpc.StatusCode.INVALID_ARGUMENT),
    ("unknown_codec", _codec, grpc.StatusCode.INVALID_ARGUMENT),
    ("fingerprint", _field("model_fingerprint", "fp-other"), grpc.StatusCode.FAILED_PRECONDITION),
    ("wrong_run", _field("run_id", "another-run"), grpc.StatusCode.FAILED_PRECONDITION),
    ("version", _field("protocol_version", 99), grpc.StatusCode.FAILED_PRECONDITION),
    ("stale_round", _field("outer_step", 1), grpc.StatusCode.OUT_OF_RANGE),
    ("stale_round", _field("outer_step", 50), grpc.StatusCode.OUT_OF_RANGE),
    ("malformed", _field("sender_id", "x" * 1000), grpc.StatusCode.INVALID_ARGUMENT),
    ("busy", _field("kind", "refuse-me"), grpc.StatusCode.RESOURCE_EXHAUSTED),
]


@pytest.mark.parametrize(
    ("reason", "mutate", "code"), MALFORMED, ids=[f"{r}-{m.__name__}" for r, m, _ in MALFORMED]
)
async def test_malformed_input_is_refused_and_the_server_keeps_serving(
    small_chunks: ProtocolConfig,
    reason: str,
    mutate: Callable[[list[pb.Frame]], list[pb.Frame]],
    code: grpc.StatusCode,
) -> None:
    payload = os.urandom(256 << 10)
    async with serving(small_chunks) as (address, handler), dialling(small_chunks) as client:
        got_code, got_reason, _ = await _send_raw(address, mutate(_frames(payload)))
        assert (got_code, got_reason) == (code, reason)
        assert handler.rejects == [reason]
        assert handler.exchanges == []  # the handler saw nothing of the bad call
        good = await client.exchange(
            address, Outgoing(make_header(len(payload)), payload), view=VIEW
        )
        assert bytes(good.payload) == REPLY(len(payload))


async def test_header_refusal_comes_as_a_reply_frame_too(small_chunks: ProtocolConfig) -> None:
    async with serving(small_chunks) as (address, _):
        frames = _field("model_fingerprint", "fp-other")(_frames(b"abcd"))
        _, reason, reply_reason = await _send_raw(address, frames)
        assert reason == reply_reason == "fingerprint"


@pytest.mark.parametrize(
    ("header_kw", "error", "reason"),
    [
        ({"model_fingerprint": "fp-x"}, IncompatiblePeer, "fingerprint"),
        ({"outer_step": 9}, PeerUnavailable, "stale_round"),
        ({"kind": "refuse-me"}, PeerUnavailable, "busy"),
    ],
)
async def test_client_raises_the_matching_error(
    small_chunks: ProtocolConfig, header_kw: dict[str, Any], error: type[PeerError], reason: str
) -> None:
    async with serving(small_chunks) as (address, _), dialling(small_chunks) as client:
        with pytest.raises(error) as info:
            await client.exchange(
                address, Outgoing(make_header(8, **header_kw), b"12345678"), view=VIEW
            )
        assert info.value.reason == reason


async def test_a_stalled_sender_times_out(small_chunks: ProtocolConfig) -> None:
    config = dataclasses.replace(small_chunks, frame_timeout_s=0.3)
    async with serving(config) as (address, handler):
        code, reason, _ = await _send_raw(address, _frames(os.urandom(256 << 10))[:2], stall_s=3)
        assert (code, reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "timeout")
        assert handler.rejects == ["timeout"]


async def test_concurrent_transfers_are_bounded(small_chunks: ProtocolConfig) -> None:
    config = dataclasses.replace(small_chunks, max_concurrent_exchanges=1)
    handler = RecordingHandler()
    handler.hold = asyncio.Event()
    async with serving(config, handler) as (address, _), dialling(config) as client:
        first = asyncio.create_task(
            client.exchange(address, Outgoing(make_header(4), b"abcd"), view=VIEW)
        )
        await handler.entered.wait()
        with pytest.raises(PeerUnavailable) as info:
            await client.exchange(address, Outgoing(make_header(4), b"wxyz"), view=VIEW)
        assert info.value.reason == "busy"
        handler.hold.set()
        assert bytes((await first).payload) == REPLY(4)


async def test_fetch_state_and_status(small_chunks: ProtocolConfig) -> None:
    async with serving(small_chunks) as (address, handler), dialling(small_chunks) as client:
        state = await client.fetch_state(
            address, view=LocalView(run_id=RUN, model_fingerprint=FINGERPRINT)
        )
        assert bytes(state.payload) == handler.state
        assert state.header.kind == "state"
        with pytest.raises(IncompatiblePeer):
            await client.fetch_state(address, view=LocalView(run_id=RUN, model_fingerprint="fp-x"))
        info = await client.status(address)
        assert (info.peer_id, info.outer_step, info.num_peers) == ("server", 5, 3)
        assert info.bytes_sent == 2 * len(handler.state)  # the second fetch was refused by us


async def test_unreachable_peer_is_unavailable(small_chunks: ProtocolConfig) -> None:
    config = dataclasses.replace(small_chunks, call_timeout_s=2.0)
    async with serving(config) as (address, _):
        pass  # the server is gone once the block exits
    async with dialling(config) as client:
        with pytest.raises(PeerUnavailable):
            await client.exchange(address, Outgoing(make_header(4), b"abcd"), view=VIEW)


def test_a_frame_crc_is_zlib_crc32() -> None:
    frames = _frames(b"0123456789abcdef" * 5000, chunk=4096 * 4)
    assert frames[-1].trailer.crc32 == zlib.crc32(b"0123456789abcdef" * 5000)


async def test_a_violation_is_translated_for_the_client(small_chunks: ProtocolConfig) -> None:
    class Lying(RecordingHandler):
        async def on_exchange(self, peer: str, received: Received) -> None:
            raise ProtocolViolation(peer, "payload did not decode")

    async with (
        serving(small_chunks, Lying()) as (address, handler),
        dialling(small_chunks) as client,
    ):
        with pytest.raises(ProtocolViolation) as info:
            await client.exchange(address, Outgoing(make_header(4), b"abcd"), view=VIEW)
        assert info.value.reason == "rejected"
        assert handler.rejects == ["rejected"]
        assert handler.abandoned == ["rejected"]


async def test_a_stalled_responder_times_out_on_the_client(small_chunks: ProtocolConfig) -> None:
    handler = RecordingHandler()
    handler.hold = asyncio.Event()  # never set: the server accepts, then says nothing
    async with serving(small_chunks, handler) as (address, _), dialling(small_chunks) as client:
        with pytest.raises(PeerUnavailable) as info:
            await client.exchange(
                address, Outgoing(make_header(4), b"abcd"), view=VIEW, timeout_s=0.5
            )
        assert info.value.reason == "timeout"
        handler.hold.set()


class CountingBucket(TokenBucket):
    def __init__(self, rate: float, burst: float) -> None:
        super().__init__(rate, burst)
        self.taken = 0

    def reserve(self, num_bytes: int, *, now: float | None = None) -> float:
        self.taken += num_bytes
        return super().reserve(num_bytes, now=now)


async def test_a_capped_upload_is_paced_under_the_receivers_progress_timeout(
    small_chunks: ProtocolConfig,
) -> None:
    receiver = dataclasses.replace(small_chunks, frame_timeout_s=0.5)
    sender = dataclasses.replace(small_chunks, max_upload_bytes_per_s=100e3)
    # 64 KiB chunks at 100 kB/s would leave 0.65 s between chunks, past the receiver's 0.5 s.
    assert sender.send_chunk_bytes / 100e3 <= 0.25
    payload = os.urandom(120_000)
    bucket = CountingBucket(100e3, sender.send_chunk_bytes)
    async with (
        serving(receiver) as (address, handler),
        PeerClient(sender, peer_id="client", bucket=bucket) as client,
    ):
        got = await client.exchange(
            address, Outgoing(make_header(len(payload)), payload), view=VIEW
        )
    assert bytes(got.payload) == REPLY(len(payload))
    assert bucket.taken == len(payload)  # every payload byte went through the cap
    assert handler.rejects == []


def test_exchange_runs_on_uvloop(small_chunks: ProtocolConfig) -> None:
    import uvloop

    async def main() -> bytes:
        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        async with serving(small_chunks) as (address, _), dialling(small_chunks) as client:
            got = await client.exchange(address, Outgoing(make_header(8), b"01234567"), view=VIEW)
            return bytes(got.payload)

    assert uvloop.run(main()) == REPLY(8)


async def test_a_caller_that_stops_reading_loses_its_slot(small_chunks: ProtocolConfig) -> None:
    config = dataclasses.replace(small_chunks, call_timeout_s=1.0, frame_timeout_s=0.3)
    handler = RecordingHandler(state=os.urandom(48 << 20))  # more than the flow-control windows
    async with (
        serving(config, handler) as (address, _),
        grpc.aio.insecure_channel(address) as channel,
    ):
        call = pb_grpc.PeerStub(channel).FetchState(
            pb.FetchStateRequest(protocol_version=1, run_id=RUN, requester_id="client"),
            metadata=(("locoswarm-peer", "client"),),
        )  # no deadline, and we read only the header
        assert (await call.read()).WhichOneof("body") == "header"
        await asyncio.wait_for(handler.rejected.wait(), 15)
        assert handler.rejects == ["timeout"]
        call.cancel()
    assert handler.bytes["sent"] < len(handler.state)


async def test_the_header_must_name_the_caller(small_chunks: ProtocolConfig) -> None:
    async with serving(small_chunks) as (address, handler):
        code, reason, _ = await _send_raw(address, _frames(b"abcd", sender="someone-else"))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "malformed")
        assert handler.exchanges == []


async def test_a_stopping_server_refuses_new_transfers(small_chunks: ProtocolConfig) -> None:
    handler = RecordingHandler()
    async with PeerServer.start(small_chunks, handler) as server:
        address = f"127.0.0.1:{server.port}"
        await server.begin_shutdown()
        async with dialling(small_chunks) as client:
            with pytest.raises(PeerUnavailable) as info:
                await client.exchange(address, Outgoing(make_header(4), b"abcd"), view=VIEW)
            assert info.value.reason == "shutting_down"
            with pytest.raises(PeerUnavailable):
                await client.fetch_state(address, view=VIEW)


class BadResponder(pb_grpc.PeerServicer):
    """A hostile peer: accepts, then answers with a payload whose checksum is wrong."""

    def __init__(self, mutate: Callable[[list[pb.Frame]], list[pb.Frame]]) -> None:
        self.mutate = mutate

    async def Exchange(self, request_iterator, context):
        frames = aiter(request_iterator)
        await anext(frames)  # the header
        await context.write(pb.Frame(reply=pb.Reply(accepted=True)))
        for frame in self.mutate(_frames(os.urandom(200_000), sender="server")):
            await context.write(frame)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (_corrupt_chunk, "bad_checksum"),
        (_truncate, "truncated"),
        (lambda fs: [*fs, fs[1]], "out_of_order"),
        (_declare_huge, "too_large"),
        (_field("model_fingerprint", "fp-evil"), "fingerprint"),
    ],
)
async def test_the_client_checks_a_hostile_reply(
    small_chunks: ProtocolConfig, mutate: Callable[[list[pb.Frame]], list[pb.Frame]], reason: str
) -> None:
    server = grpc.aio.server()
    pb_grpc.add_PeerServicer_to_server(BadResponder(mutate), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with dialling(small_chunks) as client:
            with pytest.raises(PeerError) as info:
                await client.exchange(
                    f"127.0.0.1:{port}", Outgoing(make_header(8), b"12345678"), view=VIEW
                )
            assert info.value.reason == reason
    finally:
        await server.stop(None)
