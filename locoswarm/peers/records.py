"""A node's membership record as published in the DHT, and its validation on the way back in.

Records come from strangers: ``parse_record`` accepts only the exact field types and bounded
sizes, and turns anything else into ``None`` with a reason, never an exception.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

MAX_FIELD_CHARS = 256
MAX_CAPABILITIES = 32


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

    @property
    def client_mode(self) -> bool:
        return self.address is None

    def to_wire(self) -> dict[str, Any]:
        """Plain msgpack-able dict (hivemind serialises DHT values with msgpack, never pickle)."""
        data = asdict(self)
        data["capabilities"] = list(self.capabilities)
        return data


def _text(value: object, name: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or (not value and not optional):
        raise ValueError(f"{name} must be a non-empty string")
    if len(value) > MAX_FIELD_CHARS:
        raise ValueError(f"{name} is longer than {MAX_FIELD_CHARS} characters")
    return value


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
        record = PeerRecord(
            peer_id=str(peer_id),
            address=_text(value.get("address"), "address", optional=True),
            outer_step=step,
            model_fingerprint=str(_text(value.get("model_fingerprint"), "model_fingerprint")),
            sync=str(_text(value.get("sync"), "sync")),
            version=str(_text(value.get("version"), "version")),
            capabilities=tuple(str(_text(c, "capability")) for c in caps),
        )
    except ValueError as exc:
        return None, str(exc)
    return record, "ok"
