"""Tokens, the replay cache, the upload token bucket, the reason table and the generated code."""

from __future__ import annotations

import pytest

from locoswarm.errors import (
    AuthFailed,
    ConfigError,
    IncompatiblePeer,
    PeerUnavailable,
    ProtocolViolation,
)
from locoswarm.protocol import AuthConfig, Limits, ProtocolConfig, TlsConfig, TokenBucket, codegen
from locoswarm.protocol._gen import locoswarm_pb2 as pb
from locoswarm.protocol.auth import TokenVerifier, call_metadata
from locoswarm.protocol.reasons import REASONS, error_for, reason_code, reason_name, reason_of

CONFIG = AuthConfig(secret=b"0123456789abcdef", window_s=30)
METHOD = "/locoswarm.v1.Peer/Exchange"


def test_a_fresh_token_verifies_once() -> None:
    verifier = TokenVerifier(CONFIG)
    md = dict(call_metadata(CONFIG, METHOD, "peer-a", now=1000.0))
    assert verifier.verify(METHOD, md, now=1010.0) == "peer-a"
    with pytest.raises(ValueError, match="replayed"):
        verifier.verify(METHOD, md, now=1011.0)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda md: md.pop("locoswarm-auth"), "missing"),
        (lambda md: md.update({"locoswarm-ts": "soon"}), "malformed timestamp"),
        (lambda md: md.update({"locoswarm-ts": "nan"}), "outside"),
        (lambda md: md.update({"locoswarm-ts": "1100.000"}), "outside"),
        (lambda md: md.update({"locoswarm-peer": "peer-b"}), "bad token"),
        (lambda md: md.update({"locoswarm-target": "peer-c"}), "bad token"),
        (lambda md: md.pop("locoswarm-target"), "missing"),
        (lambda md: md.update({"locoswarm-nonce": "0" * 32}), "bad token"),
        (lambda md: md.update({"locoswarm-nonce": "00"}), "malformed token"),
    ],
)
def test_bad_tokens(edit, message: str) -> None:
    md = dict(call_metadata(CONFIG, METHOD, "peer-a", now=1000.0))
    edit(md)
    with pytest.raises(ValueError, match=message):
        TokenVerifier(CONFIG).verify(METHOD, md, now=1000.0)


def test_a_token_must_name_the_verifying_peer() -> None:
    verifier = TokenVerifier(CONFIG, own_id="node-b")
    aimed = dict(call_metadata(CONFIG, METHOD, "a", target="node-a", now=1000.0))
    with pytest.raises(ValueError, match="token for another peer"):
        verifier.verify(METHOD, aimed, now=1000.0)
    anyone = dict(call_metadata(CONFIG, METHOD, "a", now=1000.0))
    with pytest.raises(ValueError, match="names no target"):
        verifier.verify(METHOD, anyone, now=1000.0)
    status = "/locoswarm.v1.Peer/Status"
    assert (
        verifier.verify(status, dict(call_metadata(CONFIG, status, "a", now=1000.0)), now=1000.0)
        == "a"
    )
    ours = dict(call_metadata(CONFIG, METHOD, "a", target="node-b", now=1000.0))
    assert verifier.verify(METHOD, ours, now=1000.0) == "a"
    # Without an id of its own (a bare server), the target is signed but not checked.
    assert TokenVerifier(CONFIG).verify(METHOD, aimed, now=1000.0) == "a"


def test_nonces_are_forgotten_after_the_window_and_bounded() -> None:
    verifier = TokenVerifier(AuthConfig(secret=CONFIG.secret, window_s=30, max_nonces=3))
    for t in range(5):
        verifier.verify(
            METHOD, dict(call_metadata(CONFIG, METHOD, "a", now=1000.0 + t)), now=1000.0 + t
        )
    assert len(verifier._nonces) <= 3
    verifier.verify(METHOD, dict(call_metadata(CONFIG, METHOD, "a", now=2000.0)), now=2000.0)
    assert len(verifier._nonces) == 1


def test_without_a_secret_only_the_caller_id_is_sent() -> None:
    assert call_metadata(AuthConfig(), METHOD, "x") == (("locoswarm-peer", "x"),)


def test_token_bucket_holds_the_rate() -> None:
    bucket = TokenBucket(1000.0, burst_bytes=100)
    start = bucket._last
    assert bucket.reserve(100, now=start) == 0.0
    assert bucket.reserve(500, now=start) == pytest.approx(0.5)
    assert bucket.reserve(500, now=start) == pytest.approx(1.0)  # queued behind the first debt
    assert bucket.reserve(0, now=start + 1.0) == pytest.approx(0.0)
    assert bucket.reserve(50, now=start + 10.0) == 0.0  # refills, but only up to the burst
    assert bucket.reserve(100, now=start + 10.0) == pytest.approx(0.05)


def test_reason_table_mirrors_the_proto_enum() -> None:
    names = {reason_name(v) for v in pb.Reason.values()} - {"unspecified"}
    assert names == set(REASONS)
    for reason in REASONS:
        assert reason_name(reason_code(reason)) == reason
    assert reason_name(999) == "unspecified"


def test_exceptions_map_to_reasons() -> None:
    assert isinstance(error_for("bad_checksum", "p", "x"), ProtocolViolation)
    assert isinstance(error_for("fingerprint", "p", "x"), IncompatiblePeer)
    assert isinstance(error_for("busy", "p", "x"), PeerUnavailable)
    assert isinstance(error_for("unauthenticated", "p", "x"), AuthFailed)
    assert reason_of(PeerUnavailable("p", "x")) == "busy"
    assert reason_of(ProtocolViolation("p", "x")) == "rejected"
    assert reason_of(ProtocolViolation("p", "x", reason="truncated")) == "truncated"


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="chunk_bytes"):
        ProtocolConfig(chunk_bytes=1 << 30)
    with pytest.raises(ConfigError, match="secret"):
        AuthConfig(secret=b"short")
    with pytest.raises(ConfigError, match="key_file"):
        TlsConfig(cert_file=__file__)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no such file"):
        TlsConfig(ca_file="/nonexistent/ca.pem")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_lag"):
        Limits(max_lag=-1)
    options = dict(ProtocolConfig().channel_options())
    assert options["grpc.so_reuseport"] == 0
    assert options["grpc.http2.ping_timeout_ms"] == 10_000


def test_generated_code_is_not_stale() -> None:
    assert codegen.stale_files() == [], "run: python -m locoswarm.protocol.codegen"
