"""Why a call was refused: the wire's Reason codes, their gRPC status codes and exception classes.

This is the one table that translates between exceptions and the wire, used by the server (to
abort a call) and by the client (to raise the matching exception). It knows nothing of tensors.
"""

from __future__ import annotations

import grpc

from locoswarm.errors import (
    AuthFailed,
    IncompatiblePeer,
    PeerError,
    PeerUnavailable,
    ProtocolViolation,
)
from locoswarm.protocol._gen import locoswarm_pb2 as pb

REASON_METADATA_KEY = "locoswarm-reason"
"""Trailing-metadata key that carries the Reason name of a refused call."""

_S = grpc.StatusCode
# reason (lower case, no REASON_ prefix) -> (gRPC status, exception class the client raises)
_TABLE: dict[str, tuple[grpc.StatusCode, type[PeerError]]] = {
    "malformed": (_S.INVALID_ARGUMENT, ProtocolViolation),
    "version": (_S.FAILED_PRECONDITION, IncompatiblePeer),
    "wrong_run": (_S.FAILED_PRECONDITION, IncompatiblePeer),
    "fingerprint": (_S.FAILED_PRECONDITION, IncompatiblePeer),
    "stale_round": (_S.OUT_OF_RANGE, PeerUnavailable),
    "unknown_codec": (_S.INVALID_ARGUMENT, ProtocolViolation),
    "too_large": (_S.RESOURCE_EXHAUSTED, ProtocolViolation),
    "size_mismatch": (_S.INVALID_ARGUMENT, ProtocolViolation),
    "chunk_too_large": (_S.INVALID_ARGUMENT, ProtocolViolation),
    "too_many_chunks": (_S.INVALID_ARGUMENT, ProtocolViolation),
    "out_of_order": (_S.INVALID_ARGUMENT, ProtocolViolation),
    "bad_checksum": (_S.INVALID_ARGUMENT, ProtocolViolation),
    "truncated": (_S.INVALID_ARGUMENT, ProtocolViolation),
    "busy": (_S.RESOURCE_EXHAUSTED, PeerUnavailable),
    "shutting_down": (_S.UNAVAILABLE, PeerUnavailable),
    "unauthenticated": (_S.UNAUTHENTICATED, AuthFailed),
    "rejected": (_S.INVALID_ARGUMENT, ProtocolViolation),
    "internal": (_S.INTERNAL, PeerUnavailable),
    "timeout": (_S.DEADLINE_EXCEEDED, PeerUnavailable),
}
REASONS: tuple[str, ...] = tuple(_TABLE)
"""Every reason name the protocol uses (the .proto enum minus UNSPECIFIED)."""

# What a handler's exception means on the wire when it names no reason itself.
_DEFAULT_REASON: tuple[tuple[type[PeerError], str], ...] = (
    (AuthFailed, "unauthenticated"),
    (IncompatiblePeer, "fingerprint"),
    (PeerUnavailable, "busy"),
    (ProtocolViolation, "rejected"),
)

# A status code seen without our metadata (a deadline, a dead connection, a foreign server).
_STATUS_FALLBACK: dict[grpc.StatusCode, str] = {
    _S.UNAUTHENTICATED: "unauthenticated",
    _S.DEADLINE_EXCEEDED: "timeout",
    _S.INVALID_ARGUMENT: "malformed",
    _S.FAILED_PRECONDITION: "version",
    _S.OUT_OF_RANGE: "stale_round",
    _S.RESOURCE_EXHAUSTED: "busy",
}


def reason_code(reason: str) -> pb.Reason:
    """The .proto enum value for a reason name."""
    code: pb.Reason = pb.Reason.Value("REASON_" + reason.upper())
    return code


def reason_name(code: int) -> str:
    """The reason name for a .proto enum value (``"unspecified"`` for unknown values)."""
    try:
        return str(pb.Reason.Name(code)).removeprefix("REASON_").lower()
    except ValueError:
        return "unspecified"


def reason_of(exc: PeerError) -> str:
    """The wire reason for an exception raised on our side."""
    if exc.reason in _TABLE:
        return exc.reason
    for cls, reason in _DEFAULT_REASON:
        if isinstance(exc, cls):
            return reason
    return "internal"


def status_of(reason: str) -> grpc.StatusCode:
    """The gRPC status code a refusal with this reason is sent with."""
    return _TABLE.get(reason, (_S.INTERNAL, PeerUnavailable))[0]


def error_for(reason: str, peer: str | None, detail: str) -> PeerError:
    """The exception a caller raises for a refusal with this reason."""
    cls = _TABLE.get(reason, (_S.INTERNAL, PeerUnavailable))[1]
    message = detail if detail.startswith(f"{reason}:") else f"{reason}: {detail}"
    return cls(peer, message, reason=reason)


def error_from_status(
    code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str | bytes], ...], peer: str
) -> PeerError:
    """Translate a failed call's status and trailing metadata into our exception."""
    reason = None
    for key, value in trailing:
        if key == REASON_METADATA_KEY:
            reason = value.decode() if isinstance(value, bytes) else value
    if reason not in _TABLE:
        reason = _STATUS_FALLBACK.get(code)
    if reason is None:  # UNAVAILABLE, CANCELLED, UNKNOWN...: the peer is unreachable or broken
        return PeerUnavailable(peer, f"{code.name}: {details}", reason="unavailable")
    return error_for(reason, peer, details or code.name)
