"""``locoswarm swarm``: the whole swarm at a glance, from the peers' DHT records.

Joins the DHT as a client (it trains nothing, listens on nothing), reads the run's records and
prints one row per live peer: id, address (or client), round, validation and training loss,
tokens/s, bytes up and down, sync mode and version. Refreshes in place like ``top``, or prints
once with ``--json``. Records are validated by ``parse_record`` like any node validates them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from locoswarm.errors import ConfigError
from locoswarm.peers.config import PeersConfig
from locoswarm.peers.membership import Membership, check_join_addresses
from locoswarm.peers.records import PeerRecord, secret_proof

COLUMNS = (
    ("peer", 14),
    ("address", 21),
    ("round", 6),
    ("val loss", 9),
    ("train loss", 10),
    ("tok/s", 9),
    ("up MB", 8),
    ("down MB", 8),
    ("mode", 6),
    ("version", 8),
)


def add_swarm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--join",
        required=True,
        action="append",
        metavar="MULTIADDR",
        help="any node's multiaddr (repeatable), as printed by `locoswarm run`",
    )
    p.add_argument("--run-id", default="locoswarm", help="the swarm's run id (default locoswarm)")
    p.add_argument(
        "--secret-file",
        type=Path,
        help="the swarm's secret: peers whose records do not prove it are marked",
    )
    p.add_argument("--json", action="store_true", help="print the rows once as JSON and exit")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument(
        "--count", type=int, default=0, help="refresh this many times and exit (default: until ^C)"
    )
    p.set_defaults(func=cmd_swarm)


def row(record: PeerRecord, secret: bytes | None, run_id: str) -> dict[str, Any]:
    """One peer's row (what ``--json`` prints)."""
    stats = record.stats
    out: dict[str, Any] = {
        "peer_id": record.peer_id,
        "address": record.address,
        "round": record.outer_step,
        "val_loss": None if stats is None else stats.val_loss,
        "train_loss": None if stats is None else stats.train_loss,
        "tokens_per_s": None if stats is None else stats.tokens_per_s,
        "sent_bytes": None if stats is None else stats.sent_bytes,
        "received_bytes": None if stats is None else stats.received_bytes,
        "sync": record.sync,
        "version": record.version,
    }
    if secret is not None:
        out["same_secret"] = record.secret_proof == secret_proof(secret, run_id, record.peer_id)
    return out


def _num(value: float | None, spec: str, scale: float = 1.0) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return format(value / scale, spec)


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width table."""
    lines = ["  ".join(f"{name:<{width}}" for name, width in COLUMNS)]
    for r in rows:
        peer = r["peer_id"]
        cells = [
            peer if len(peer) <= 14 else f"{peer[:6]}..{peer[-6:]}",
            r["address"] or "client",
            str(r["round"]),
            _num(r["val_loss"], ".4f"),
            _num(r["train_loss"], ".4f"),
            _num(r["tokens_per_s"], ",.0f"),
            _num(r["sent_bytes"], ".1f", 1e6),
            _num(r["received_bytes"], ".1f", 1e6),
            r["sync"],
            r["version"],
        ]
        line = "  ".join(f"{c:<{w}}" for c, (_, w) in zip(cells, COLUMNS, strict=True))
        if r.get("same_secret") is False:
            line += "  (another secret)"
        lines.append(line)
    return "\n".join(lines)


async def watch(a: argparse.Namespace, secret: bytes | None) -> int:
    config = PeersConfig(
        run_id=a.run_id,
        initial_peers=tuple(a.join),
        host_maddrs=("/ip4/127.0.0.1/tcp/0",),
        client_mode=True,
        bootstrap_attempts=2,
    )
    async with Membership.start(config) as membership:
        shown = 0
        while True:
            records = sorted(await membership.list_peers(), key=lambda r: r.peer_id)
            rows = [row(r, secret, a.run_id) for r in records]
            if a.json:
                print(json.dumps(rows, indent=1))
                return 0
            clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
            stamp = time.strftime("%H:%M:%S")
            print(
                f"{clear}swarm {a.run_id}: {len(rows)} live peers at {stamp}\n{table(rows)}",
                flush=True,
            )
            shown += 1
            if a.count and shown >= a.count:
                return 0
            await asyncio.sleep(a.interval)


def cmd_swarm(a: argparse.Namespace) -> int:
    from locoswarm.node.daemon import _read_secret

    check_join_addresses(tuple(a.join))
    if a.interval <= 0 or a.count < 0:
        raise ConfigError("--interval must be > 0 and --count >= 0")
    return asyncio.run(watch(a, _read_secret(a.secret_file)))
