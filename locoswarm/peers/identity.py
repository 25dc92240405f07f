"""A node's identity: one RSA key that names it on the DHT's libp2p network and signs its record.

hivemind's ``p2pd`` derives the peer id from the key in ``identity_path``; the same key signs our
membership record through hivemind's ``RSASignatureValidator``, whose subkey carries the public
key (``[owner:...]``). Every node's DHT then refuses a change to that subkey that the key did not
sign, and a reader checks that the record's peer id is the one the key derives: nobody else can
overwrite, withdraw or impersonate a node's record.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import multihash  # hivemind's dependency (peer ids are multihashes)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

_OWNER = re.compile(re.escape(RSASignatureValidator.PUBLIC_KEY_FORMAT).replace(b"_key_", rb"(.+?)"))
MAX_SUBKEY_BYTES = 2048
"""A record subkey is the peer id plus an RSA-2048 public key in OpenSSH form (~430 bytes)."""


class IdentityError(ValueError):
    """An identity file that is not a libp2p RSA private key."""


class _LoadedKey(RSAPrivateKey):  # type: ignore[misc]  # hivemind is untyped
    """hivemind's RSA key type, from a key we already have (hivemind's only generates one)."""

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        self._private_key = key


def load_identity(path: Path) -> RSAPrivateKey:
    """The RSA key in ``path`` (a libp2p private key, as ``p2pd`` reads it); made there first
    when the file does not exist (readable by its owner only).

    Raises:
        IdentityError: The file exists but holds no RSA private key.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        P2P.generate_identity(str(path))
    data = path.read_bytes()
    try:
        proto = crypto_pb2.PrivateKey.FromString(data)
        if proto.key_type != crypto_pb2.KeyType.RSA:
            raise IdentityError(f"identity file {path} holds a non-RSA key ({proto.key_type})")
        key = serialization.load_der_private_key(proto.data, password=None)
    except IdentityError:
        raise
    except Exception as exc:  # noqa: BLE001 - protobuf and cryptography raise many types
        raise IdentityError(f"identity file {path} is not a libp2p private key: {exc}") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise IdentityError(f"identity file {path} holds a non-RSA key")
    return _LoadedKey(key)


def peer_id_of(key: RSAPrivateKey) -> str:
    """The libp2p peer id ``p2pd`` derives from ``key``."""
    return _peer_id_from_public(key.get_public_key().to_bytes())


def _peer_id_from_public(openssh: bytes) -> str:
    public = serialization.load_ssh_public_key(openssh)
    if not isinstance(public, rsa.RSAPublicKey):
        raise ValueError("not an RSA public key")
    der = public.public_bytes(
        encoding=serialization.Encoding.DER,
        format=serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    proto = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(proto).digest(), multihash.coerce_code("sha2-256"))
    return str(PeerID(digest))


def record_subkey(peer_id: str, validator: RSASignatureValidator) -> bytes:
    """The subkey our record is stored under: our peer id and our public key (so that every DHT
    node with the validator requires our signature on it)."""
    marker: bytes = validator.local_public_key
    return peer_id.encode() + marker


def subkey_owner(subkey: object) -> tuple[str | None, str]:
    """The peer id a record's subkey belongs to, or (None, why the subkey is not a signed one).
    The subkey must be ``<peer id><owner marker>`` and the peer id the one the marker's key
    derives (the DHT's validator already checked the signature over the record)."""
    if not isinstance(subkey, bytes):
        return None, "unsigned record (its subkey names no owner key)"
    if len(subkey) > MAX_SUBKEY_BYTES:
        return None, f"record subkey longer than {MAX_SUBKEY_BYTES} bytes"
    matches = list(_OWNER.finditer(subkey))
    if len(matches) != 1:
        return None, "unsigned record (its subkey names no owner key)"
    claimed = subkey[: matches[0].start()]
    try:
        owner = _peer_id_from_public(matches[0].group(1))
    except Exception:  # noqa: BLE001 - a stranger's bytes: any parse error is a bad key
        return None, "record subkey holds an unreadable owner key"
    if claimed.decode("ascii", "replace") != owner:
        return None, "record subkey names a peer id its owner key does not derive"
    return owner, "ok"
