"""Auth tokens, TLS, mutual TLS, health and reflection on real grpc.aio servers on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from locoswarm.errors import AuthFailed, PeerUnavailable
from locoswarm.protocol import AuthConfig, LocalView, Outgoing, ProtocolConfig, TlsConfig
from locoswarm.protocol._gen import locoswarm_pb2 as pb
from locoswarm.protocol._gen import locoswarm_pb2_grpc as pb_grpc
from locoswarm.protocol.auth import call_metadata
from locoswarm.protocol.certs import make_ca, make_leaf, write_pem
from locoswarm.protocol.frames import frame_messages
from locoswarm.protocol.reasons import REASON_METADATA_KEY
from tests.component.conftest import FINGERPRINT, REPLY, RUN, dialling, make_header, serving

VIEW = LocalView(run_id=RUN, model_fingerprint=FINGERPRINT, outer_step=5)
SECRET = b"swarm-secret-0123456789"


@pytest.fixture
def authed(small_chunks: ProtocolConfig) -> ProtocolConfig:
    return dataclasses.replace(small_chunks, auth=AuthConfig(secret=SECRET))


async def test_exchange_status_and_state_with_a_valid_token(authed: ProtocolConfig) -> None:
    payload = os.urandom(100_000)
    async with serving(authed) as (address, handler), dialling(authed) as client:
        got = await client.exchange(
            address, Outgoing(make_header(len(payload)), payload), view=VIEW
        )
        assert bytes(got.payload) == REPLY(len(payload))
        assert (await client.status(address)).peer_id == "server"
        state = await client.fetch_state(
            address, view=LocalView(run_id=RUN, model_fingerprint=FINGERPRINT)
        )
        assert bytes(state.payload) == handler.state
        assert handler.rejects == []


@pytest.mark.parametrize("secret", [None, b"another-secret-0123456789"])
async def test_missing_or_wrong_token_gets_unauthenticated_and_nothing_else(
    authed: ProtocolConfig, secret: bytes | None
) -> None:
    intruder = dataclasses.replace(authed, auth=AuthConfig(secret=secret))
    async with serving(authed) as (address, handler), dialling(intruder) as client:
        for call in (
            client.exchange(address, Outgoing(make_header(4), b"abcd"), view=VIEW),
            client.status(address),
            client.fetch_state(address, view=VIEW),
        ):
            with pytest.raises(AuthFailed) as info:
                await call
            assert info.value.reason == "unauthenticated"
        assert handler.exchanges == []
        assert handler.bytes == {"sent": 0, "received": 0}
        assert handler.rejects == ["unauthenticated"] * 3
        async with dialling(authed) as friend:  # the server still serves good calls
            assert (await friend.status(address)).peer_id == "server"


async def _raw_status(
    address: str, metadata: tuple[tuple[str, str], ...]
) -> tuple[grpc.StatusCode, str]:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            await pb_grpc.PeerStub(channel).Status(pb.StatusRequest(), metadata=metadata, timeout=5)
        except grpc.aio.AioRpcError as err:
            return err.code(), str(dict(err.trailing_metadata() or ()).get(REASON_METADATA_KEY))
        return grpc.StatusCode.OK, ""


async def test_replayed_and_expired_tokens_are_refused(authed: ProtocolConfig) -> None:
    method = "/locoswarm.v1.Peer/Status"
    async with serving(authed) as (address, handler):
        token = call_metadata(authed.auth, method, "c")
        assert await _raw_status(address, token) == (grpc.StatusCode.OK, "")
        assert await _raw_status(address, token) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "unauthenticated",
        )
        old = call_metadata(authed.auth, method, "c", now=1_000_000.0)
        assert (await _raw_status(address, old))[0] == grpc.StatusCode.UNAUTHENTICATED
        other_method = call_metadata(authed.auth, "/locoswarm.v1.Peer/Exchange", "c")
        assert (await _raw_status(address, other_method))[0] == grpc.StatusCode.UNAUTHENTICATED
        forged = tuple((k, "mallory" if k == "locoswarm-peer" else v) for k, v in token)
        assert (await _raw_status(address, forged))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert handler.rejects == ["unauthenticated"] * 4


async def test_a_token_aimed_at_another_node_is_refused(authed: ProtocolConfig) -> None:
    """Two nodes share the secret; a call (or a token seen on its way) aimed at one is refused
    by the other, and a token without a target is taken for the read-only Status only."""
    async with (
        serving(authed, peer_id="node-a") as (a, handler_a),
        serving(authed, peer_id="node-b") as (b, handler_b),
        dialling(authed) as client,
    ):
        payload = os.urandom(1000)
        got = await client.exchange(
            a, Outgoing(make_header(len(payload)), payload), view=VIEW, target="node-a"
        )
        assert bytes(got.payload) == REPLY(len(payload))
        state_view = LocalView(run_id=RUN, model_fingerprint=FINGERPRINT)
        for call in (
            client.exchange(b, Outgoing(make_header(4), b"abcd"), view=VIEW, target="node-a"),
            client.exchange(b, Outgoing(make_header(4), b"abcd"), view=VIEW),
            client.fetch_state(b, view=state_view, target="node-a"),
            client.fetch_state(b, view=state_view),
            client.status(b, target="node-a"),
        ):
            with pytest.raises(AuthFailed) as info:
                await call
            assert info.value.reason == "unauthenticated"
        assert handler_b.exchanges == []
        assert handler_b.bytes == {"sent": 0, "received": 0}
        assert handler_b.rejects == ["unauthenticated"] * 5
        # A token seen on its way to node-a, replayed to node-b before node-a used it.
        token = call_metadata(authed.auth, "/locoswarm.v1.Peer/Status", "c", target="node-a")
        assert (await _raw_status(b, token))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert await _raw_status(a, token) == (grpc.StatusCode.OK, "")
        assert (await client.status(b)).peer_id == "server"  # Status: any target
        assert (await client.status(b, target="node-b")).peer_id == "server"
        assert len(handler_a.exchanges) == 1


async def test_health_answers_serving_to_a_stock_client_without_a_token(
    authed: ProtocolConfig,
) -> None:
    async with serving(authed) as (address, _), grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "locoswarm.v1.Peer"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_services(small_chunks: ProtocolConfig) -> None:
    async with serving(small_chunks) as (address, _), grpc.aio.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in stub.ServerReflectionInfo(iter([request]), timeout=5):
            names = {s.name for s in reply.list_services_response.service}
            break
        assert {"locoswarm.v1.Peer", "grpc.health.v1.Health"} <= names


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pki")
    ca = make_ca()
    paths = {"ca": write_pem(ca, root, "ca")[1]}
    for name in ("server", "client"):
        paths[f"{name}_key"], paths[f"{name}_cert"] = write_pem(make_leaf(ca, name), root, name)
    stranger = make_leaf(make_ca("stranger CA"), "stranger")
    paths["stranger_key"], paths["stranger_cert"] = write_pem(stranger, root, "stranger")
    return paths


def _tls(base: ProtocolConfig, pki: dict[str, Path], who: str, *, mutual: bool) -> ProtocolConfig:
    return dataclasses.replace(
        base,
        tls=TlsConfig(
            cert_file=pki[f"{who}_cert"],
            key_file=pki[f"{who}_key"],
            ca_file=pki["ca"],
            require_client_auth=mutual,
        ),
    )


async def test_tls_exchange(small_chunks: ProtocolConfig, pki: dict[str, Path]) -> None:
    server_cfg = _tls(small_chunks, pki, "server", mutual=False)
    client_cfg = dataclasses.replace(small_chunks, tls=TlsConfig(ca_file=pki["ca"]))
    payload = os.urandom(300_000)
    async with serving(server_cfg) as (address, _), dialling(client_cfg) as client:
        got = await client.exchange(
            address, Outgoing(make_header(len(payload)), payload), view=VIEW
        )
        assert bytes(got.payload) == REPLY(len(payload))
    async with serving(server_cfg) as (address, _), dialling(small_chunks) as plain:
        with pytest.raises(PeerUnavailable):  # a plaintext caller cannot talk to a TLS server
            await plain.status(address, timeout_s=3)


async def test_mutual_tls_needs_a_certificate_from_the_swarm_ca(
    small_chunks: ProtocolConfig, pki: dict[str, Path]
) -> None:
    server_cfg = _tls(small_chunks, pki, "server", mutual=True)
    async with serving(server_cfg) as (address, handler):
        async with dialling(_tls(small_chunks, pki, "client", mutual=True)) as member:
            got = await member.exchange(address, Outgoing(make_header(4), b"abcd"), view=VIEW)
            assert bytes(got.payload) == REPLY(4)
        no_cert = dataclasses.replace(small_chunks, tls=TlsConfig(ca_file=pki["ca"]))
        async with dialling(no_cert) as anonymous:
            with pytest.raises(PeerUnavailable):
                await anonymous.status(address, timeout_s=3)
        stranger = dataclasses.replace(
            small_chunks,
            tls=TlsConfig(
                cert_file=pki["stranger_cert"], key_file=pki["stranger_key"], ca_file=pki["ca"]
            ),
        )
        async with dialling(stranger) as outsider:
            with pytest.raises(PeerUnavailable):
                await outsider.status(address, timeout_s=3)
        assert len(handler.exchanges) == 1


async def test_health_watch_and_reflection_need_a_token_when_a_secret_is_set(
    authed: ProtocolConfig,
) -> None:
    async with serving(authed) as (address, handler), grpc.aio.insecure_channel(address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await watch.read()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.ServerReflectionInfo(iter([request]), timeout=5):
                pass
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert handler.rejects == ["unauthenticated"] * 2


async def test_a_replayed_exchange_token_is_refused(authed: ProtocolConfig) -> None:
    token = call_metadata(authed.auth, "/locoswarm.v1.Peer/Exchange", "client")
    frames = frame_messages(make_header(4), b"abcd", 1 << 16)
    async with serving(authed) as (address, handler), grpc.aio.insecure_channel(address) as channel:
        codes = []
        for attempt in range(2):
            confirm = pb.Frame(reply=pb.Reply(accepted=True))
            sent = [*frames, confirm] if attempt == 0 else frames[:1]  # as our client does
            call = pb_grpc.PeerStub(channel).Exchange(iter(sent), metadata=token, timeout=5)
            try:
                async for _frame in call:
                    pass
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as err:
                codes.append(err.code())
        assert codes == [grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED]
        assert len(handler.exchanges) == 1


async def test_repeated_identity_metadata_is_refused(authed: ProtocolConfig) -> None:
    token = call_metadata(authed.auth, "/locoswarm.v1.Peer/Status", "mallory")
    spoofed = (("locoswarm-peer", "victim"), *token)
    assert await _raw_status_code(authed, spoofed) == grpc.StatusCode.UNAUTHENTICATED


async def _raw_status_code(
    config: ProtocolConfig, metadata: tuple[tuple[str, str], ...]
) -> grpc.StatusCode:
    async with serving(config) as (address, _):
        code, _ = await _raw_status(address, metadata)
        return code
