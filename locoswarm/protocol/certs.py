"""Self-signed certificates for a swarm: one small CA and a leaf per node (``cryptography``).

For swarms without a public PKI: make a CA once, give each node a leaf signed by it plus the CA
certificate, and turn on TLS (and mutual TLS) with those files.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True, slots=True)
class Pem:
    """A private key and its certificate, PEM-encoded."""

    key: bytes
    cert: bytes


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _builder(
    subject: str, issuer: str, public_key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )


def make_ca(name: str = "locoswarm swarm CA", *, days: int = 3650) -> Pem:
    """A new self-signed CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Pem(key=_key_pem(key), cert=cert.public_bytes(serialization.Encoding.PEM))


def make_leaf(
    ca: Pem, name: str, *, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"), days: int = 825
) -> Pem:
    """A node certificate signed by ``ca``, valid for ``hosts`` (DNS names or IP addresses)."""
    ca_key = serialization.load_pem_private_key(ca.key, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an EC key made by make_ca")
    ca_cert = x509.load_pem_x509_certificate(ca.cert)
    issuer = ca_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(name, str(issuer), key.public_key(), days)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return Pem(key=_key_pem(key), cert=cert.public_bytes(serialization.Encoding.PEM))


def write_pem(pem: Pem, directory: Path, stem: str) -> tuple[Path, Path]:
    """Write ``<stem>.key`` (mode 0600) and ``<stem>.pem`` into ``directory``; return both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = directory / f"{stem}.key", directory / f"{stem}.pem"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # also when the file already existed with a looser mode
    with os.fdopen(fd, "wb") as out:
        out.write(pem.key)
    cert_path.write_bytes(pem.cert)
    return key_path, cert_path
