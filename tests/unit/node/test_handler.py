"""The node's gRPC handler (``node/handler.py``) on its own: group calls that wait for our round,
a group that closes under them, and a cancelled call."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from locoswarm.errors import PeerUnavailable, ProtocolViolation
from locoswarm.node.config import load_config
from locoswarm.node.handler import NodeHandler
from locoswarm.node.metrics import NodeMetrics
from locoswarm.node.outer import OuterStep
from locoswarm.peers import Matchmaker, PeerHealth, PeersConfig
from locoswarm.protocol import Header, Received
from locoswarm.sync.rounds import Partner


def _handler() -> NodeHandler:
    config = load_config(
        None, {"sync.mode": "diloco", "sync.group_size": "4", "sync.bits": "32"}, {}
    )
    outer = OuterStep(config, torch.zeros(64), peer_id="a", fp="f")
    peers = PeersConfig(run_id=config.run_id, group_size=4)
    health = PeerHealth(peers)

    async def decode(received: Received) -> Partner:
        return outer.decode(received)

    handler = NodeHandler(
        outer=outer,
        matchmaker=Matchmaker(peers, "a", health=health),
        health=health,
        metrics=NodeMetrics(),
        version="t",
        match_wait_s=30.0,
        exchange_wait_s=30.0,
        group_size=4,
        decode=decode,
        num_peers=lambda: 3,
    )
    handler.open_round(outer.prepare(0, torch.zeros(64)), group=True)
    return handler


def _rs_header(handler: NodeHandler) -> Header:
    return Header(
        run_id=handler.outer.config.run_id,
        outer_step=0,
        strategy="diloco",
        sender_id="b",
        model_fingerprint="f",
        kind="rs",
    )


async def test_a_group_call_whose_group_closes_is_refused_as_busy() -> None:
    handler = _handler()
    call = asyncio.ensure_future(handler.admit("b", _rs_header(handler)))
    await asyncio.sleep(0.01)  # waiting for our roster and vector
    handler.close_round()
    with pytest.raises(PeerUnavailable) as info:
        await call
    assert info.value.reason == "busy"


async def test_a_cancelled_group_call_stays_cancelled() -> None:
    # Cancelling the call (the server shutting down, the peer gone) must not be turned into a
    # refusal the caller then reports as the peer's fault.
    handler = _handler()
    call = asyncio.ensure_future(handler.admit("b", _rs_header(handler)))
    await asyncio.sleep(0.01)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert call.cancelled()
    handler.close_round()


@pytest.mark.parametrize("kind", ["nonsense", "state", "outer"])
async def test_kinds_that_do_not_belong_in_a_group_exchange_are_malformed(kind: str) -> None:
    # A group swarm proposes with "join": a pair's "outer", a "state" (FetchState only) or an
    # unknown kind is refused as malformed, naming the kind.
    handler = _handler()
    header = dataclasses.replace(_rs_header(handler), kind=kind)
    with pytest.raises(ProtocolViolation) as info:
        await handler.admit("b", header)
    assert info.value.reason == "malformed"
    assert kind in str(info.value)
    handler.close_round()
