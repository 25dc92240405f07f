"""Peers: swarm membership in the hivemind DHT, matchmaking decisions, peer health.

Knows peer ids, addresses and outer steps; nothing of gRPC, tensors or the sync algorithms.
"""

from locoswarm.peers.config import PeersConfig
from locoswarm.peers.health import PeerHealth
from locoswarm.peers.matchmaker import Match, Matchmaker
from locoswarm.peers.pairing import Plan, decide_proposal, plan_round
from locoswarm.peers.records import PeerRecord, parse_record

__all__ = [
    "Match",
    "Matchmaker",
    "PeerHealth",
    "PeerRecord",
    "PeersConfig",
    "Plan",
    "decide_proposal",
    "parse_record",
    "plan_round",
]
