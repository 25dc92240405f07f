"""Fixtures for component tests: real grpc.aio servers on 127.0.0.1 with a recording handler."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from locoswarm.errors import PeerUnavailable
from locoswarm.protocol import (
    Header,
    LocalView,
    Outgoing,
    PeerClient,
    PeerServer,
    ProtocolConfig,
    Received,
    StatusInfo,
    TensorSpec,
)

RUN = "run-test"
FINGERPRINT = "fp-1234"


def make_header(
    payload_len: int, *, outer_step: int = 5, sender: str = "client", **kw: Any
) -> Header:
    spec = TensorSpec(
        name="w", codec="fp32", dtype="float32", shape=(payload_len // 4,), num_bytes=payload_len
    )
    fields: dict[str, Any] = {
        "run_id": RUN,
        "outer_step": outer_step,
        "strategy": "noloco",
        "sender_id": sender,
        "model_fingerprint": FINGERPRINT,
        "tensors": (spec,),
        "kind": "outer_grad",
    }
    fields.update(kw)
    return Header(**fields)


def REPLY(num_bytes: int, sender: str = "client") -> bytes:
    """What ``RecordingHandler`` sends back to ``sender`` for a payload of ``num_bytes``."""
    seed = sender.encode() * 8
    return (seed * (num_bytes // len(seed) + 1))[:num_bytes]


class RecordingHandler:
    """Answers an exchange with the received bytes reversed; records what reached it."""

    def __init__(self, *, outer_step: int = 5, state: bytes = b"state-bytes" * 100) -> None:
        self.outer_step = outer_step
        self.state = state
        self.exchanges: list[Received] = []
        self.abandoned: list[str] = []
        self.rejects: list[str] = []
        self.bytes = {"sent": 0, "received": 0}
        self.hold: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.rejected = asyncio.Event()

    def local_view(self) -> LocalView:
        return LocalView(run_id=RUN, model_fingerprint=FINGERPRINT, outer_step=self.outer_step)

    async def admit(self, peer: str, header: Header) -> Outgoing:
        if header.kind == "refuse-me":
            raise PeerUnavailable(peer, "already exchanging this outer step", reason="busy")
        self.entered.set()
        if self.hold is not None:
            await self.hold.wait()
        reply = REPLY(header.total_bytes, header.sender_id)
        return Outgoing(make_header(len(reply), outer_step=self.outer_step, sender="server"), reply)

    async def on_exchange(self, peer: str, received: Received) -> None:
        self.exchanges.append(received)

    def on_abandoned(self, peer: str, header: Header, reason: str) -> None:
        self.abandoned.append(reason)

    async def on_fetch_state(self, peer: str) -> Outgoing:
        spec = TensorSpec(
            name="state",
            codec="fp32",
            dtype="uint8",
            shape=(len(self.state),),
            num_bytes=len(self.state),
        )
        header = make_header(
            0,
            outer_step=self.outer_step,
            sender="server",
            tensors=(spec,),
            strategy="state",
            kind="state",
        )
        return Outgoing(header=header, payload=self.state)

    def status(self) -> StatusInfo:
        return StatusInfo(
            peer_id="server",
            run_id=RUN,
            outer_step=self.outer_step,
            strategy="noloco",
            version="test",
            num_peers=3,
            bytes_sent=self.bytes["sent"],
            bytes_received=self.bytes["received"],
            model_fingerprint=FINGERPRINT,
        )

    def on_transfer(self, direction: str, num_bytes: int) -> None:
        self.bytes[direction] += num_bytes

    def on_reject(self, reason: str) -> None:
        self.rejects.append(reason)
        self.rejected.set()


def loopback(config: ProtocolConfig | None = None, **kw: Any) -> ProtocolConfig:
    base = config or ProtocolConfig()
    return dataclasses.replace(base, host="127.0.0.1", port=0, **kw)


@contextlib.asynccontextmanager
async def serving(
    config: ProtocolConfig, handler: RecordingHandler | None = None, peer_id: str | None = None
) -> AsyncIterator[tuple[str, RecordingHandler]]:
    handler = handler or RecordingHandler()
    async with PeerServer.start(config, handler, peer_id=peer_id) as server:
        yield f"127.0.0.1:{server.port}", handler


@contextlib.asynccontextmanager
async def dialling(config: ProtocolConfig, peer_id: str = "client") -> AsyncIterator[PeerClient]:
    client = PeerClient(config, peer_id=peer_id)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def payload() -> bytes:
    return os.urandom(1 << 20)  # 1 MiB: 16 chunks of 64 KiB


@pytest.fixture
def small_chunks() -> ProtocolConfig:
    return loopback(
        chunk_bytes=64 << 10, frame_timeout_s=5.0, call_timeout_s=20.0, shutdown_grace_s=0.5
    )
