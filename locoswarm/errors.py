"""Exception taxonomy for locoswarm: each class says whose fault an error was.

Leaf module: imports only the standard library and knows nothing about tensors, sockets or
algorithms.
"""

from __future__ import annotations


class LocoswarmError(Exception):
    """Base class for errors locoswarm raises on purpose."""


class ConfigError(LocoswarmError, ValueError):
    """Our own configuration or input is invalid. Raised at startup; the CLI exits with status 2."""


class DataError(ConfigError):
    """A data path given by the user is missing, empty or unusable."""


class PeerError(LocoswarmError):
    """A remote peer misbehaved or could not be reached. Carries who, for scoring and logs."""

    def __init__(self, peer: str | None, message: str, *, reason: str | None = None) -> None:
        super().__init__(f"peer {peer or '?'}: {message}")
        self.peer = peer
        self.message = message
        self.reason = reason
        """Machine-readable cause, e.g. ``"bad_checksum"`` (the wire protocol's Reason names, lower
        case without the ``REASON_`` prefix); ``None`` when the raiser gave none."""


class ProtocolViolation(PeerError):
    """Malformed, oversized or inconsistent message. Never retried this outer step."""


class AuthFailed(PeerError):
    """Missing or invalid credentials."""


class IncompatiblePeer(PeerError):
    """Different run_id, protocol version or model fingerprint. Excluded from pairing."""


class PeerUnavailable(PeerError):
    """Timeout, refusal, shutdown or not ready. Retryable with another partner."""


class OuterStepAborted(LocoswarmError):
    """This outer step cannot complete. Local state is restored and training continues."""


class CheckpointError(LocoswarmError):
    """A checkpoint is missing, unreadable, or does not match the config."""
