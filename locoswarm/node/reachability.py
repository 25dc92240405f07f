"""The reachability self-test at start: can peers dial this node's gRPC address?

The node asks the peers it joined through to dial the address it announces (``peers/reach.py``,
over the DHT's libp2p connection, which works whichever side is behind NAT) and says what it
learned, with what to do when nobody could reach it. The answer is in the log, the ready file
(``reachable``) and the ``locoswarm_node_reachable`` gauge.
"""

from __future__ import annotations

import logging

from locoswarm.node.metrics import NodeMetrics
from locoswarm.peers.membership import Membership
from locoswarm.peers.reach import REACHED, ask, peer_of

log = logging.getLogger("locoswarm.node")

MAX_ASKED = 3
"""Peers asked at most (the first that answers decides)."""


def advice(address: str) -> str:
    port = address.rsplit(":", 1)[-1]
    return (
        f"peers cannot dial this node at {address}, so only nodes that can be dialled will "
        f"pair with it. To fix: forward TCP port {port} (gRPC) to this machine and set "
        f"--announce PUBLIC_HOST:{port}; or, behind a NAT you do not control, run with "
        "--client-mode (no server: peers reach the node over libp2p, relayed through the "
        "peers it joined through, then hole-punched)"
    )


async def self_test(
    membership: Membership, address: str | None, join: tuple[str, ...], metrics: NodeMetrics
) -> bool | None:
    """Ask up to ``MAX_ASKED`` of the peers in ``join`` to dial ``address``; log and return
    whether one reached it (None: no peer could be asked, or the node dials out only)."""
    if address is None:
        log.info(
            "reachability: client mode, no gRPC server: peers reach this node over libp2p "
            "(relayed through the peers it joined through, then hole-punched)"
        )
        metrics.reachable.set(0)
        return None
    peers = [p for p in dict.fromkeys(peer_of(m) for m in join) if p is not None][:MAX_ASKED]
    if not peers:
        log.info("reachability: no peer to ask yet (this node starts the swarm)")
        return None
    p2p = await membership.p2p()
    failures = []
    for peer in peers:
        try:
            reply = await ask(p2p, peer, address)
        except Exception as exc:  # noqa: BLE001 - a peer that cannot be asked is no answer
            failures.append(f"{peer}: not asked ({type(exc).__name__}: {exc})"[:200])
            continue
        if reply == REACHED:
            log.info("reachability: %s reached our gRPC address %s directly", peer, address)
            metrics.reachable.set(1)
            return True
        if reply.startswith("unreachable"):
            log.warning(
                "reachability: %s could not reach %s (%s); %s",
                peer,
                address,
                reply,
                advice(address),
            )
            metrics.reachable.set(0)
            return False
        failures.append(f"{peer}: {reply}")
    log.info("reachability: no peer could test %s: %s", address, "; ".join(failures))
    return None
