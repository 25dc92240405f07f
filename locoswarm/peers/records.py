"""A node's membership record as published in the DHT, and its validation on the way back in.

Records come from strangers: ``parse_record`` accepts only the exact field types and bounded
sizes, and turns anything else into ``None`` with a reason, never an exception.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

MAX_FIELD_CHARS = 256
MAX_CAPABILITIES = 32
_PROOF = re.compile(r"[0-9a-f]{32}")


def secret_proof(secret: bytes, run_id: str, peer_id: str) -> str:
    """What a record carries to show it was written by a holder of the swarm secret: a keyed
    hash of the run and the peer id. Nodes with a different secret (or none) compute a different
    value and leave the record out of matchmaking. It is a filter against misconfiguration, not
    an authentication: every call is still authenticated by its own token."""
    message = f"locoswarm-record\n{run_id}\n{peer_id}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()[:32]


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerStats:
    """What a node reports about its training, for ``locoswarm swarm`` (all optional)."""

    train_loss: float | None = None
    """Mean training loss of its last round."""
    val_loss: float | None = None
    """Its last validation loss on the task's held-out data."""
    tokens_per_s: float | None = None
    sent_bytes: int | None = None
    received_bytes: int | None = None


_STAT_TYPES = {f.name: (int if f.name.endswith("_bytes") else float) for f in fields(PeerStats)}


LIBP2P = "libp2p"
"""Capability: exchanges over libp2p streams of the DHT's daemon (the path to a node with no
gRPC address)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerRecord:
    """What a node tells the swarm about itself."""

    peer_id: str
    address: str | None
    """``host:port`` of its gRPC server, or None in client mode."""
    outer_step: int
    model_fingerprint: str
    sync: str
    """Sync mode: noloco, diloco or ef."""
    version: str
    capabilities: tuple[str, ...] = ()
    """Optional features, e.g. codec ids it accepts."""
    secret_proof: str | None = None
    """``secret_proof(secret, run, peer_id)`` when the node holds a swarm secret."""
    stats: PeerStats | None = None

    @property
    def client_mode(self) -> bool:
        return self.address is None

    @property
    def over_libp2p(self) -> bool:
        """It serves exchanges over its DHT's libp2p streams (dialled by peer id, relayed or
        hole-punched where it has no reachable address)."""
        return LIBP2P in self.capabilities

    def to_wire(self) -> dict[str, Any]:
        """Plain msgpack-able dict (hivemind serialises DHT values with msgpack, never pickle)."""
        data = asdict(self)
        data["capabilities"] = list(self.capabilities)
        if self.stats is not None:
            data["stats"] = {
                k: v
                for k, v in asdict(self.stats).items()
                if v is not None and math.isfinite(v)  # a NaN loss is not published
            }
        return data


def _text(value: object, name: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or (not value and not optional):
        raise ValueError(f"{name} must be a non-empty string")
    if len(value) > MAX_FIELD_CHARS:
        raise ValueError(f"{name} is longer than {MAX_FIELD_CHARS} characters")
    return value


def _stats(value: object) -> PeerStats | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > len(_STAT_TYPES):
        raise ValueError(f"stats must be a map of at most {len(_STAT_TYPES)} entries")
    out: dict[str, float | int] = {}
    for key, item in value.items():
        kind = _STAT_TYPES.get(key) if isinstance(key, str) else None
        if kind is None:
            raise ValueError(f"stats has an unknown entry {str(key)[:40]!r}")
        if isinstance(item, bool) or not isinstance(item, int | float):
            raise ValueError(f"stats.{key} must be a number")
        if kind is int and (not isinstance(item, int) or not 0 <= item < 1 << 63):
            raise ValueError(f"stats.{key} must be a non-negative integer")
        if kind is float and not math.isfinite(item):
            raise ValueError(f"stats.{key} must be finite")
        out[key] = kind(item)
    return PeerStats(**out)  # type: ignore[arg-type]


def parse_record(subkey: object, value: object) -> tuple[PeerRecord | None, str]:
    """Validate one DHT entry; return (record, "ok") or (None, why it was dropped)."""
    if value is None:
        return None, "withdrawn"
    if not isinstance(value, dict):
        return None, f"record is a {type(value).__name__}, not a map"
    try:
        peer_id = _text(value.get("peer_id"), "peer_id")
        if peer_id != subkey:
            return None, f"record for {peer_id!r} stored under subkey {subkey!r}"
        step = value.get("outer_step")
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 1 << 63:
            raise ValueError("outer_step must be a non-negative integer")
        caps = value.get("capabilities", [])
        if not isinstance(caps, list | tuple) or len(caps) > MAX_CAPABILITIES:
            raise ValueError(f"capabilities must be a list of at most {MAX_CAPABILITIES}")
        proof = value.get("secret_proof")
        if proof is not None and not (isinstance(proof, str) and _PROOF.fullmatch(proof)):
            raise ValueError("secret_proof must be 32 hex digits")
        record = PeerRecord(
            peer_id=str(peer_id),
            address=_text(value.get("address"), "address", optional=True),
            outer_step=step,
            model_fingerprint=str(_text(value.get("model_fingerprint"), "model_fingerprint")),
            sync=str(_text(value.get("sync"), "sync")),
            version=str(_text(value.get("version"), "version")),
            capabilities=tuple(str(_text(c, "capability")) for c in caps),
            secret_proof=proof,
            stats=_stats(value.get("stats")),
        )
    except ValueError as exc:
        return None, str(exc)
    return record, "ok"
