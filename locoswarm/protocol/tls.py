"""gRPC credentials from the PEM files named in ``TlsConfig``."""

from __future__ import annotations

from pathlib import Path

import grpc

from locoswarm.errors import ConfigError
from locoswarm.protocol.config import TlsConfig


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"protocol.tls.{what}: cannot read {path}: {exc.strerror}") from exc


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials | None:
    """Credentials to serve TLS (mutual when ``require_client_auth``), or None for plaintext."""
    if tls.cert_file is None:
        return None
    return grpc.ssl_server_credentials(
        [(_read(tls.key_file, "key_file"), _read(tls.cert_file, "cert_file"))],
        root_certificates=_read(tls.ca_file, "ca_file"),
        require_client_auth=tls.require_client_auth,
    )


def channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials | None:
    """Credentials to dial TLS peers (presenting our certificate for mTLS), or None."""
    if not tls.enabled:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file, "ca_file"),
        private_key=_read(tls.key_file, "key_file"),
        certificate_chain=_read(tls.cert_file, "cert_file"),
    )
