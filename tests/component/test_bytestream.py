"""The Exchange over a plain byte stream (the libp2p path's carrier), on real TCP streams on
127.0.0.1: the same frames, checks, refusals and auth as the gRPC path."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator

import pytest

from locoswarm.errors import AuthFailed, IncompatiblePeer, PeerUnavailable
from locoswarm.protocol import (
    AuthConfig,
    LocalView,
    Outgoing,
    PeerClient,
    ProtocolConfig,
    bytestream,
)
from locoswarm.protocol._gen import locoswarm_pb2 as pb
from locoswarm.protocol.auth import call_metadata
from locoswarm.protocol.bytestream import EXCHANGE, StreamRoute, read_message, write_message
from locoswarm.protocol.frames import serialize
from locoswarm.protocol.server import Servicer
from tests.component.conftest import (
    FINGERPRINT,
    REPLY,
    RUN,
    RecordingHandler,
    dialling,
    make_header,
)

VIEW = LocalView(run_id=RUN, model_fingerprint=FINGERPRINT, outer_step=5)
SECRET = b"swarm-secret-0123456789"


@contextlib.asynccontextmanager
async def stream_serving(
    config: ProtocolConfig,
    *,
    caller: str = "client",
    peer_id: str | None = "server",
    via: str = "libp2p",
    budget: int | None = None,
    handler: RecordingHandler | None = None,
) -> AsyncIterator[tuple[StreamRoute, RecordingHandler]]:
    """A servicer behind a TCP listener that plays the libp2p daemon: every connection is one
    stream from ``caller`` (the id libp2p would have authenticated)."""
    handler = handler or RecordingHandler()
    streams = Servicer(config, handler, None).streams(peer_id)
    served: set[asyncio.Task[None]] = set()

    async def on_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        served.add(task)
        await streams.serve(reader, writer, caller=caller, via=via)

    listener = await asyncio.start_server(on_stream, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]

    async def open_stream() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return reader, writer, via

    route = StreamRoute("libp2p:server", open_stream, relay_budget=budget)
    try:
        yield route, handler
    finally:
        listener.close()
        for task in served:
            task.cancel()
        await asyncio.gather(*served, return_exceptions=True)


@pytest.mark.parametrize("size", [0, 100, 1 << 20])
async def test_an_exchange_over_a_byte_stream_round_trips_bit_exact(
    small_chunks: ProtocolConfig, size: int
) -> None:
    payload = os.urandom(size)
    async with stream_serving(small_chunks) as (route, handler), dialling(small_chunks) as client:
        got = await client.exchange(route, Outgoing(make_header(size), payload), view=VIEW)
        assert bytes(got.payload) == REPLY(size)
        assert got.header.sender_id == "server"
        (seen,) = handler.exchanges
        assert bytes(seen.payload) == payload
        assert handler.bytes == {"sent": size, "received": size}


async def test_a_refusal_travels_as_the_stream_end(small_chunks: ProtocolConfig) -> None:
    async with stream_serving(small_chunks) as (route, handler), dialling(small_chunks) as client:
        with pytest.raises(IncompatiblePeer) as info:
            await client.exchange(
                route, Outgoing(make_header(8, model_fingerprint="fp-x"), b"12345678"), view=VIEW
            )
        assert info.value.reason == "fingerprint"
        with pytest.raises(PeerUnavailable) as busy:
            await client.exchange(
                route, Outgoing(make_header(8, kind="refuse-me"), b"12345678"), view=VIEW
            )
        assert busy.value.reason == "busy"
        assert handler.rejects == ["fingerprint", "busy"]
        good = await client.exchange(route, Outgoing(make_header(4), b"abcd"), view=VIEW)
        assert bytes(good.payload) == REPLY(4)


async def test_a_call_in_another_peers_name_is_refused(small_chunks: ProtocolConfig) -> None:
    """libp2p authenticates the stream's peer: the call's own caller id must be that peer."""
    async with (
        stream_serving(small_chunks, caller="mallory") as (route, handler),
        dialling(small_chunks, peer_id="client") as client,
    ):
        with pytest.raises(AuthFailed) as info:
            await client.exchange(route, Outgoing(make_header(4), b"abcd"), view=VIEW)
        assert "not the stream's peer" in str(info.value)
        assert handler.rejects == ["unauthenticated"]
        assert handler.exchanges == []


async def test_with_a_secret_tokens_are_checked_and_must_name_the_callee(
    small_chunks: ProtocolConfig,
) -> None:
    authed = dataclasses.replace(small_chunks, auth=AuthConfig(secret=SECRET))
    wrong = dataclasses.replace(small_chunks, auth=AuthConfig(secret=b"another-secret-012345"))
    async with stream_serving(authed) as (route, handler):
        client = PeerClient(authed, peer_id="client")
        intruder = PeerClient(wrong, peer_id="client")
        try:
            got = await client.exchange(
                route, Outgoing(make_header(4), b"abcd"), view=VIEW, target="server"
            )
            assert bytes(got.payload) == REPLY(4)
            for caller, target in ((client, "another-node"), (intruder, "server")):
                with pytest.raises(AuthFailed):
                    await caller.exchange(
                        route, Outgoing(make_header(4), b"abcd"), view=VIEW, target=target
                    )
        finally:
            await client.close()
            await intruder.close()
        assert handler.rejects == ["unauthenticated", "unauthenticated"]
        assert len(handler.exchanges) == 1


async def _raw_call(route: StreamRoute, messages: list[bytes]) -> pb.StreamEnd:
    """Send raw messages; return the callee's StreamEnd (frames before it are skipped)."""
    reader, writer, _ = await route.open()
    try:
        for message in messages:
            await write_message(writer, message)
        async with asyncio.timeout(10):
            while await read_message(reader, 1 << 24, None):
                pass
            end: pb.StreamEnd = pb.StreamEnd.FromString(
                await read_message(reader, 4096, None) or b""
            )
            return end
    finally:
        writer.close()


def _open(method: str = EXCHANGE) -> bytes:
    metadata = dict(call_metadata(AuthConfig(), method, "client"))
    data: bytes = pb.StreamOpen(method=method, metadata=metadata).SerializeToString()
    return data


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([b"\xff" * 40], "malformed"),  # not a StreamOpen
        ([_open("/locoswarm.v1.Peer/Status")], "malformed"),  # only Exchange on this path
        ([_open(), b"\x0a\xff\xff"], "malformed"),  # a frame that is not a Frame
        ([_open(), serialize(pb.Frame(trailer=pb.Trailer()))], "out_of_order"),
        ([_open(), b""], "truncated"),  # frames end before a header
    ],
    ids=["open", "method", "frame", "order", "empty"],
)
async def test_garbage_on_the_stream_is_refused_and_the_server_keeps_serving(
    small_chunks: ProtocolConfig, messages: list[bytes], reason: str
) -> None:
    async with stream_serving(small_chunks) as (route, handler), dialling(small_chunks) as client:
        end = await _raw_call(route, messages)
        assert not end.ok
        assert pb.Reason.Name(end.reason) == "REASON_" + reason.upper()
        assert handler.exchanges == []
        good = await client.exchange(route, Outgoing(make_header(4), b"abcd"), view=VIEW)
        assert bytes(good.payload) == REPLY(4)


async def test_an_oversized_length_is_refused_before_anything_is_read(
    small_chunks: ProtocolConfig,
) -> None:
    async with stream_serving(small_chunks) as (route, _):
        reader, writer, _ = await route.open()
        writer.write(b"\xff\xff\xff\xff\x0f")  # a 4 GiB message announced
        await writer.drain()
        async with asyncio.timeout(10):
            assert await read_message(reader, 0, None) == b""
            end = pb.StreamEnd.FromString(await read_message(reader, 4096, None) or b"")
            assert (end.ok, end.reason) == (False, pb.Reason.REASON_TOO_LARGE)
            assert await reader.read() == b""  # then the callee closes the stream
        writer.close()


async def test_a_stream_that_cannot_be_opened_is_unavailable(small_chunks: ProtocolConfig) -> None:
    async def refuse() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
        raise ConnectionRefusedError("no route to the peer")

    async with dialling(small_chunks) as client:
        with pytest.raises(PeerUnavailable) as info:
            await client.exchange(
                StreamRoute("libp2p:nobody", refuse), Outgoing(make_header(4), b"abcd"), view=VIEW
            )
        assert "cannot open a stream" in str(info.value)


async def test_a_relayed_stream_carries_payloads_under_the_budget_only(
    small_chunks: ProtocolConfig,
) -> None:
    async with (
        stream_serving(small_chunks, via="relayed", budget=1000) as (route, handler),
        dialling(small_chunks) as client,
    ):
        finished: list[str] = []

        async def after(via: str) -> None:
            finished.append(via)

        route = dataclasses.replace(route, after=after)
        small = await client.exchange(route, Outgoing(make_header(1000), bytes(1000)), view=VIEW)
        assert bytes(small.payload) == REPLY(1000)
        assert finished == ["relayed"]  # the node drops a relayed connection it used
        with pytest.raises(PeerUnavailable) as info:
            await client.exchange(route, Outgoing(make_header(1001), bytes(1001)), view=VIEW)
        assert info.value.reason == "relay_budget"
        assert len(handler.exchanges) == 1  # nothing of the large one was sent
        assert finished == ["relayed"]  # and keeps one refused unused: hole punching goes on


async def test_bytes_are_counted_by_path(small_chunks: ProtocolConfig) -> None:
    """The path of the call is in the context of everything that counts its bytes."""
    seen: list[tuple[str, str, int]] = []

    class PathHandler(RecordingHandler):
        def on_transfer(self, direction: str, num_bytes: int) -> None:
            seen.append((bytestream.path.get(), direction, num_bytes))

    async with stream_serving(small_chunks, via="relayed", handler=PathHandler()) as (route, _):
        client = PeerClient(
            small_chunks,
            peer_id="client",
            on_transfer=lambda d, n: seen.append((bytestream.path.get(), "client-" + d, n)),
        )
        await client.exchange(route, Outgoing(make_header(300), bytes(300)), view=VIEW)
        await client.close()
    assert {p for p, _, _ in seen} == {"relayed"}
    assert sum(n for _, d, n in seen if d == "client-sent") == 300
    assert sum(n for _, d, n in seen if d == "received") == 300  # the callee's count


async def test_a_late_joiner_fetches_state_over_a_byte_stream(small_chunks: ProtocolConfig) -> None:
    """FetchState travels the same path: a node behind NAT can serve a late joiner its state."""
    async with stream_serving(small_chunks) as (route, handler), dialling(small_chunks) as client:
        got = await client.fetch_state(route, view=VIEW)
        assert bytes(got.payload) == handler.state
        assert got.header.kind == "state"
        wrong = LocalView(run_id="another-run", model_fingerprint=FINGERPRINT, outer_step=5)
        with pytest.raises(IncompatiblePeer) as info:
            await client.fetch_state(route, view=wrong)
        assert info.value.reason == "wrong_run"


async def test_a_relayed_stream_refuses_a_state_over_the_budget(
    small_chunks: ProtocolConfig,
) -> None:
    async with (
        stream_serving(small_chunks, via="relayed", budget=100) as (route, handler),
        dialling(small_chunks) as client,
    ):
        with pytest.raises(PeerUnavailable) as info:
            await client.fetch_state(route, view=VIEW, expect_bytes=len(handler.state))
        assert info.value.reason == "relay_budget"
