"""Swarm-secret call authentication: HMAC tokens in call metadata, checked by a server interceptor.

A token is HMAC-SHA256(secret, method | peer id | target peer id | timestamp | nonce). The server
accepts it when the timestamp is within the configured window of its clock, the nonce has not
been seen inside that window (replays are refused) and the token names the server's own peer id
as its target: a token seen on the way to one node is refused by every other. Only ``Status``
(read-only) takes a token for any target (``ANY_TARGET``), so ``locoswarm status ADDRESS`` works
without knowing the node's id. Only the unary health ``Check`` needs no token, so stock probes
(Docker HEALTHCHECK, grpc_health_probe, Kubernetes) work; health ``Watch`` and reflection streams
need one, so strangers cannot hold server slots with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from locoswarm.protocol.config import AuthConfig
from locoswarm.protocol.reasons import REASON_METADATA_KEY

PEER_KEY = "locoswarm-peer"
TS_KEY = "locoswarm-ts"
NONCE_KEY = "locoswarm-nonce"
AUTH_KEY = "locoswarm-auth"
TARGET_KEY = "locoswarm-target"
ANY_TARGET = "*"
"""The target of a token for whichever node answers (accepted for ``Status`` only)."""

SERVICE = "/locoswarm.v1.Peer/"
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check"})
"""The only calls served without a token."""
ANY_TARGET_METHODS = frozenset({SERVICE + "Status"})
"""Calls that accept a token aimed at ``ANY_TARGET`` (read-only)."""
_METHOD_KINDS = {
    SERVICE + "Exchange": "stream_stream",
    SERVICE + "FetchState": "unary_stream",
    SERVICE + "Status": "unary_unary",
    "/grpc.health.v1.Health/Watch": "unary_stream",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": "stream_stream",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": "stream_stream",
}
_NONCE = re.compile(r"[0-9a-f]{32}")
_TOKEN = re.compile(r"[0-9a-f]{64}")


def _mac(secret: bytes, method: str, peer: str, target: str, ts: str, nonce: str) -> str:
    message = "\n".join((method, peer, target, ts, nonce)).encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def call_metadata(
    config: AuthConfig,
    method: str,
    peer_id: str,
    *,
    target: str = ANY_TARGET,
    now: float | None = None,
) -> tuple[tuple[str, str], ...]:
    """Metadata for one call: who calls and, with a secret, a fresh token for the node whose
    peer id is ``target``."""
    if config.secret is None:
        return ((PEER_KEY, peer_id),)
    ts = f"{time.time() if now is None else now:.3f}"
    nonce = secrets.token_hex(16)
    return (
        (PEER_KEY, peer_id),
        (TARGET_KEY, target),
        (TS_KEY, ts),
        (NONCE_KEY, nonce),
        (AUTH_KEY, _mac(config.secret, method, peer_id, target, ts, nonce)),
    )


class TokenVerifier:
    """Checks tokens and remembers nonces for one window (replay protection). With ``own_id``,
    a token must name it as its target (``ANY_TARGET`` only for ``ANY_TARGET_METHODS``)."""

    def __init__(self, config: AuthConfig, own_id: str | None = None) -> None:
        if config.secret is None:
            raise ValueError("TokenVerifier needs a secret")
        self.own_id = own_id
        self.secret = config.secret
        self.window_s = config.window_s
        self.max_nonces = config.max_nonces
        self._nonces: OrderedDict[str, float] = OrderedDict()

    def verify(self, method: str, metadata: dict[str, str], *, now: float | None = None) -> str:
        """Return the caller's peer id, or raise ``ValueError`` saying what was wrong.

        ``metadata`` holds one value per key; callers refuse repeated keys before.
        """
        now = time.time() if now is None else now
        peer, target = metadata.get(PEER_KEY, ""), metadata.get(TARGET_KEY, "")
        ts, nonce, token = (metadata.get(k, "") for k in (TS_KEY, NONCE_KEY, AUTH_KEY))
        if not (peer and target and ts and nonce and token):
            raise ValueError("missing token")
        if (
            not (_NONCE.fullmatch(nonce) and _TOKEN.fullmatch(token))
            or max(len(peer), len(target)) > 256
        ):
            raise ValueError("malformed token")
        try:
            stamp = float(ts)
        except ValueError:
            raise ValueError("malformed timestamp") from None
        if not abs(now - stamp) <= self.window_s:
            raise ValueError(f"timestamp {ts} outside the {self.window_s:.0f}s window")
        if not hmac.compare_digest(token, _mac(self.secret, method, peer, target, ts, nonce)):
            raise ValueError("bad token")
        if self.own_id is not None and target != self.own_id:
            if target != ANY_TARGET:
                raise ValueError(f"token for another peer ({target[:64]})")
            if method not in ANY_TARGET_METHODS:
                raise ValueError("token names no target peer")
        self._forget_expired(now)
        if nonce in self._nonces:
            raise ValueError("replayed token")
        self._nonces[nonce] = stamp + self.window_s
        return peer

    def _forget_expired(self, now: float) -> None:
        # Nonces are stored in arrival order; expiry times are close to that order, so popping
        # from the front until one is still live forgets nearly all expired ones cheaply.
        while self._nonces:
            _, expiry = next(iter(self._nonces.items()))
            if expiry >= now and len(self._nonces) < self.max_nonces:
                break
            self._nonces.popitem(last=False)


def _deny(kind: str, detail: str) -> grpc.RpcMethodHandler:
    trailing = ((REASON_METADATA_KEY, "unauthenticated"),)

    async def abort(request: Any, context: Any) -> None:
        if kind.startswith("stream"):
            # Take the caller's first message (our client sends only its header before it is
            # accepted) so the status is not lost to a write still in flight (grpc/grpc#36066).
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await anext(aiter(request))
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, detail, trailing_metadata=trailing)

    factory: Callable[..., grpc.RpcMethodHandler] = getattr(grpc, f"{kind}_rpc_method_handler")
    return factory(abort)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every locoswarm call without a valid token with UNAUTHENTICATED and nothing else."""

    def __init__(
        self,
        config: AuthConfig,
        on_reject: Callable[[str], None] | None = None,
        *,
        own_id: str | None = None,
    ) -> None:
        self.verifier = TokenVerifier(config, own_id)
        self.on_reject = on_reject

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method in OPEN_METHODS:
            return await continuation(handler_call_details)
        kind = _METHOD_KINDS.get(method, "unary_unary")
        metadata: dict[str, str] = {}
        repeated = False
        for key, value in handler_call_details.invocation_metadata or ():
            repeated |= key in metadata and key.startswith("locoswarm-")
            metadata[key] = value if isinstance(value, str) else value.decode(errors="replace")
        try:
            if repeated:
                raise ValueError("repeated locoswarm-* metadata")
            self.verifier.verify(method, metadata)
        except ValueError as exc:
            if self.on_reject is not None:
                self.on_reject("unauthenticated")
            return _deny(kind, f"unauthenticated: {exc}")
        return await continuation(handler_call_details)
