"""The wire protocol's knobs: listen address, limits, timeouts, keepalive, TLS, auth, upload cap.

Knows nothing of tensors or algorithms: a limit is a number of bytes, chunks or tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from locoswarm.errors import ConfigError
from locoswarm.protocol.ratelimit import TokenBucket

PROTOCOL_VERSION = 1
"""Bumped whenever a change to locoswarm.proto breaks peers that run the previous version."""

MiB = 1 << 20
MIN_CHUNK_BYTES = 16 << 10


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """What a node accepts from a peer. Every declared size is checked against these first."""

    max_payload_bytes: int = 4 << 30
    """Largest payload (all tensors of one exchange) a peer may declare."""
    max_state_bytes: int = 8 << 30
    """Largest state a FetchState reply may declare."""
    max_inflight_bytes: int = 8 << 30
    """Most payload bytes this node receives at once over all calls (more are refused as busy)."""
    max_elements: int = 1 << 34
    """Most elements one tensor spec may declare (its shape's product)."""
    max_tensors: int = 4096
    """Most tensor specs in one header."""
    max_chunk_bytes: int = 8 * MiB
    """Largest chunk a peer may declare or send."""
    max_ndim: int = 8
    """Most dimensions of one tensor spec."""
    max_name_chars: int = 256
    """Longest tensor name, run id, peer id, codec or strategy string."""
    max_lag: int = 2
    """An exchange header's outer step may differ from ours by at most this much."""
    allowed_codecs: frozenset[str] = frozenset(
        {"fp32", "fp16", "bf16", "int8", "int4", "sign", "topk"}
    )
    """Codec ids a payload may name. node/ sets this from the compression layer."""

    def __post_init__(self) -> None:
        for name in (
            "max_payload_bytes",
            "max_state_bytes",
            "max_inflight_bytes",
            "max_tensors",
            "max_elements",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"protocol.limits.{name} must be > 0, got {getattr(self, name)}")
        if not MIN_CHUNK_BYTES <= self.max_chunk_bytes <= 64 * MiB:
            raise ConfigError(
                f"protocol.limits.max_chunk_bytes must be in 16 KiB..64 MiB, "
                f"got {self.max_chunk_bytes}"
            )
        if self.max_lag < 0:
            raise ConfigError(f"protocol.limits.max_lag must be >= 0, got {self.max_lag}")

    @property
    def max_chunks(self) -> int:
        """Most chunks a payload may declare: the largest payload in the smallest chunks."""
        return -(-max(self.max_payload_bytes, self.max_state_bytes) // MIN_CHUNK_BYTES)


@dataclass(frozen=True, kw_only=True, slots=True)
class TlsConfig:
    """TLS from PEM files: with a cert and key a node serves TLS; ``ca_file`` checks peers."""

    cert_file: Path | None = None
    """This node's certificate chain (PEM)."""
    key_file: Path | None = None
    """This node's private key (PEM)."""
    ca_file: Path | None = None
    """Certificates this node trusts for its peers (PEM). Required to dial TLS peers."""
    require_client_auth: bool = False
    """Mutual TLS: callers must present a certificate signed by ``ca_file``."""
    server_name: str | None = None
    """Name expected in the peer's certificate when it differs from the dialled host."""

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("protocol.tls needs both cert_file and key_file, or neither")
        if self.require_client_auth and (self.ca_file is None or self.cert_file is None):
            raise ConfigError(
                "protocol.tls.require_client_auth needs protocol.tls.ca_file, cert_file and "
                "key_file"
            )
        for name in ("cert_file", "key_file", "ca_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"protocol.tls.{name}: no such file {path}")

    @property
    def enabled(self) -> bool:
        """Whether this node serves and dials TLS."""
        return self.cert_file is not None or self.ca_file is not None


@dataclass(frozen=True, kw_only=True, slots=True)
class AuthConfig:
    """Swarm-secret authentication of every Exchange, FetchState and Status call."""

    secret: bytes | None = None
    """Shared swarm secret; None turns authentication off."""
    window_s: float = 60.0
    """A token's timestamp may differ from our clock by at most this much."""
    max_nonces: int = 100_000
    """Most remembered nonces (for replay detection; about 100 bytes each). Past it the oldest
    are forgotten early, so keep it above the calls a node answers within ``window_s``."""

    def __post_init__(self) -> None:
        if self.secret is not None and len(self.secret) < 16:
            raise ConfigError("protocol.auth.secret must be at least 16 bytes")
        if self.window_s <= 0:
            raise ConfigError(f"protocol.auth.window_s must be > 0, got {self.window_s}")
        if self.max_nonces < 1:
            raise ConfigError(f"protocol.auth.max_nonces must be >= 1, got {self.max_nonces}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ProtocolConfig:
    """Everything the gRPC server and client need."""

    host: str = "0.0.0.0"
    """Address the server binds."""
    port: int = 0
    """Port the server binds; 0 picks a free one (the bound port is reported)."""
    chunk_bytes: int = 4 * MiB
    """Size of the chunks this node sends."""
    limits: Limits = field(default_factory=Limits)
    tls: TlsConfig = field(default_factory=TlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    call_timeout_s: float = 300.0
    """Deadline of a whole Exchange or FetchState call."""
    frame_timeout_s: float = 30.0
    """Longest wait for the next frame of a stream (a stalled peer is dropped after this)."""
    status_timeout_s: float = 5.0
    """Deadline of a Status call."""
    keepalive_s: float = 20.0
    """Interval of HTTP/2 keepalive pings."""
    ping_timeout_s: float = 10.0
    """A ping unanswered for this long drops the connection (detects frozen peers)."""
    max_concurrent_exchanges: int = 4
    """Exchange and FetchState calls served at once; more are refused as busy."""
    max_concurrent_rpcs: int = 64
    """Server-wide cap on calls in flight (gRPC answers RESOURCE_EXHAUSTED past it)."""
    max_upload_bytes_per_s: float | None = None
    """Cap on what this node sends (token bucket over all calls); None for no cap."""
    shutdown_grace_s: float = 5.0
    """How long the server lets calls in flight finish when it stops."""
    relay_budget_bytes: int = 120 << 10
    """The largest payload sent over a relayed libp2p stream (p2pd's relays cut a connection
    after about 128 KiB); a larger one means a solo step until the connection is direct."""
    max_reconnect_backoff_s: float = 10.0
    """Longest wait before a channel retries a peer it could not reach (gRPC's default, 120 s,
    would hide a peer that came back for minutes)."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"protocol.port must be in 0..65535, got {self.port}")
        if self.relay_budget_bytes < 0:
            raise ConfigError(
                f"protocol.relay_budget_bytes must be >= 0, got {self.relay_budget_bytes}"
            )
        if not MIN_CHUNK_BYTES <= self.chunk_bytes <= self.limits.max_chunk_bytes:
            raise ConfigError(
                f"protocol.chunk_bytes must be in 16 KiB..limits.max_chunk_bytes "
                f"({self.limits.max_chunk_bytes}), got {self.chunk_bytes}"
            )
        for name in (
            "call_timeout_s",
            "frame_timeout_s",
            "status_timeout_s",
            "keepalive_s",
            "ping_timeout_s",
            "shutdown_grace_s",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"protocol.{name} must be > 0, got {getattr(self, name)}")
        if self.max_concurrent_exchanges < 1 or self.max_concurrent_rpcs < 1:
            raise ConfigError(
                "protocol.max_concurrent_exchanges and max_concurrent_rpcs must be >= 1"
            )
        if self.max_upload_bytes_per_s is not None and self.max_upload_bytes_per_s <= 0:
            raise ConfigError(
                f"protocol.max_upload_bytes_per_s must be > 0, got {self.max_upload_bytes_per_s}"
            )

    @property
    def send_chunk_bytes(self) -> int:
        """Chunk size this node sends: ``chunk_bytes``, cut under an upload cap so that a chunk
        leaves about every 0.25 s and never trips a receiver's progress timeout."""
        if self.max_upload_bytes_per_s is None:
            return self.chunk_bytes
        paced = int(self.max_upload_bytes_per_s / 4)
        return max(MIN_CHUNK_BYTES, min(self.chunk_bytes, paced))

    def make_bucket(self) -> TokenBucket | None:
        """The node's upload bucket (share one between server and client), or None."""
        if self.max_upload_bytes_per_s is None:
            return None
        return TokenBucket(self.max_upload_bytes_per_s, self.send_chunk_bytes)

    def server_options(self) -> list[tuple[str, int | str]]:
        """``channel_options`` plus the server-only ones."""
        return [
            *self.channel_options(),
            ("grpc.max_concurrent_streams", self.max_concurrent_rpcs),
            ("grpc.compression_enabled_algorithms_bitset", 1),  # accept identity only
        ]

    def channel_options(self) -> list[tuple[str, int | str]]:
        """gRPC options shared by server and channels (ops.md §1.3-1.4)."""
        return [
            ("grpc.so_reuseport", 0),
            ("grpc.max_send_message_length", self.limits.max_chunk_bytes + MiB),
            ("grpc.max_receive_message_length", self.limits.max_chunk_bytes + MiB),
            ("grpc.http2.lookahead_bytes", 16 * MiB),
            ("grpc.keepalive_time_ms", int(self.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.ping_timeout_s * 1000)),
            ("grpc.http2.ping_timeout_ms", int(self.ping_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", int(self.keepalive_s * 500)),
            ("grpc.http2.max_ping_strikes", 0),
            (
                "grpc.initial_reconnect_backoff_ms",
                min(1000, int(self.max_reconnect_backoff_s * 1000)),
            ),
            ("grpc.max_reconnect_backoff_ms", int(self.max_reconnect_backoff_s * 1000)),
        ]
