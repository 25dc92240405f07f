"""Records from the DHT are strangers' input: the new fields are validated like the old ones."""

from __future__ import annotations

import math
from typing import Any

import pytest

from locoswarm.peers.records import PeerRecord, PeerStats, parse_record, secret_proof


def _record(**kw: Any) -> PeerRecord:
    return PeerRecord(
        peer_id="p1",
        address="127.0.0.1:1",
        outer_step=3,
        model_fingerprint="f",
        sync="diloco",
        version="0",
        **kw,
    )


def test_stats_and_proof_survive_the_wire() -> None:
    proof = secret_proof(b"s" * 16, "run", "p1")
    stats = PeerStats(train_loss=2.5, val_loss=2.25, tokens_per_s=100.0, sent_bytes=7)
    record = _record(secret_proof=proof, stats=stats)
    assert parse_record("p1", record.to_wire()) == (record, "ok")


def test_a_nan_loss_is_not_published() -> None:
    wire = _record(stats=PeerStats(train_loss=math.nan, sent_bytes=1)).to_wire()
    assert wire["stats"] == {"sent_bytes": 1}
    assert parse_record("p1", wire)[0] is not None


def test_the_proof_depends_on_the_secret_the_run_and_the_peer() -> None:
    base = secret_proof(b"a" * 16, "run", "p1")
    assert len(base) == 32
    assert base == secret_proof(b"a" * 16, "run", "p1")
    others = {
        secret_proof(b"b" * 16, "run", "p1"),
        secret_proof(b"a" * 16, "run2", "p1"),
        secret_proof(b"a" * 16, "run", "p2"),
    }
    assert base not in others


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"secret_proof": "xyz"}, "secret_proof must be 32 hex digits"),
        ({"secret_proof": 5}, "secret_proof must be 32 hex digits"),
        ({"stats": [1]}, "stats must be a map"),
        ({"stats": {"cpu": 1.0}}, "stats has an unknown entry 'cpu'"),
        ({"stats": {"val_loss": "low"}}, "stats.val_loss must be a number"),
        ({"stats": {"val_loss": math.inf}}, "stats.val_loss must be finite"),
        ({"stats": {"sent_bytes": -1}}, "stats.sent_bytes must be a non-negative integer"),
        ({"stats": {"sent_bytes": 1.5}}, "stats.sent_bytes must be a non-negative integer"),
        ({"stats": {"tokens_per_s": True}}, "stats.tokens_per_s must be a number"),
        ({"stats": {str(i): 1 for i in range(50)}}, "stats must be a map of at most"),
    ],
)
def test_bad_new_fields_drop_the_record_with_a_reason(change: dict[str, Any], why: str) -> None:
    wire = {**_record().to_wire(), **change}
    record, reason = parse_record("p1", wire)
    assert record is None
    assert reason.startswith(why)
