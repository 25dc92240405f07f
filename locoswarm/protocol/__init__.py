"""The wire: locoswarm.proto, the gRPC server and client, framing, limits, auth and TLS.

Moves bytes and headers between nodes; knows nothing of tensors, codecs' meaning or algorithms.
"""

from locoswarm.protocol.client import PeerClient
from locoswarm.protocol.config import (
    PROTOCOL_VERSION,
    AuthConfig,
    Limits,
    ProtocolConfig,
    TlsConfig,
)
from locoswarm.protocol.frames import Header, LocalView, Received, TensorSpec
from locoswarm.protocol.handler import ExchangeHandler, Outgoing, StatusInfo
from locoswarm.protocol.ratelimit import TokenBucket
from locoswarm.protocol.server import PeerServer

__all__ = [
    "PROTOCOL_VERSION",
    "AuthConfig",
    "ExchangeHandler",
    "Header",
    "Limits",
    "LocalView",
    "Outgoing",
    "PeerClient",
    "PeerServer",
    "ProtocolConfig",
    "Received",
    "StatusInfo",
    "TensorSpec",
    "TlsConfig",
    "TokenBucket",
]
