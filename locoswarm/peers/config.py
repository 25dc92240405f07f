"""The peers layer's knobs: DHT addresses, record lifetime, matchmaking deadlines, backoff, bans."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from locoswarm.errors import ConfigError

Pairing = Literal["random", "hypercube", "hypercube-shuffled"]
"""random: a seeded shuffle of the live ids per round; hypercube: rank i meets i XOR 2^(r mod d);
hypercube-shuffled: the same, with the ranks reshuffled every d rounds."""
PAIRINGS: tuple[str, ...] = get_args(Pairing)


def default_pairing(mode: str, group_size: int) -> Pairing:
    """The schedule a mode runs when none is set: the best measured (bench/convergence.py, full
    regime): diloco pairs on the hypercube; random groups for everything else (ef's block
    rotation aliases with a fixed cube, noloco was not measured on one)."""
    return "hypercube" if mode == "diloco" and group_size == 2 else "random"


def say_default_pairing() -> str:
    return "hypercube for diloco pairs, random otherwise"


@dataclass(frozen=True, kw_only=True, slots=True)
class PeersConfig:
    """How a node finds peers and chooses partners."""

    run_id: str = "locoswarm"
    """Swarm name; records live under a key derived from it."""
    initial_peers: tuple[str, ...] = ()
    """Multiaddrs of any existing nodes to join through; empty for the first node."""
    host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    """Where the DHT listens (libp2p multiaddrs)."""
    announce_maddrs: tuple[str, ...] = ()
    """Public multiaddrs to advertise when they differ from the listening ones (NAT, docker)."""
    identity_path: Path | None = None
    """Private key file that keeps this node's DHT peer id across restarts."""
    client_mode: bool = False
    """No gRPC server and no inbound DHT requests (a node behind NAT). Peers still reach it
    over libp2p: relayed through the peers it joined through, then hole-punched."""
    record_ttl_s: float = 30.0
    """Records expire this long after their last refresh."""
    refresh_interval_s: float = 10.0
    """How often a node re-publishes its record."""
    bootstrap_timeout_s: float = 15.0
    """How long one attempt to reach the initial peers may take."""
    bootstrap_attempts: int = 3
    """Attempts before an unreachable bootstrap address is an error."""
    lag_window: int = 2
    """Peers whose outer step differs from ours by more than this are not partners."""
    group_size: int = 2
    """Nodes per exchange: 2 (pairs) for noloco and ef, up to k for diloco."""
    min_peers: int = 0
    """Before its first round, wait until this many other live nodes are seen (a swarm that
    starts together); 0 starts at once."""
    min_peers_timeout_s: float = 120.0
    """Longest wait for ``min_peers``; then training starts with whoever is there."""
    pairing: Pairing | None = None
    """random: a seeded shuffle per round; hypercube: partner rank i XOR 2^(r mod d), with
    random pairs for whoever has no partner in the cube (consensus.md §4); hypercube-shuffled:
    the same with the ranks reshuffled every d rounds. Unset: the mode's default
    (``default_pairing``)."""
    listen_share: float = 0.5
    """Share of the match deadline a non-dialling node waits for its planned dialler before it
    starts dialling free peers itself."""
    backoff_base_s: float = 5.0
    """First backoff after a failed exchange; it doubles with each failure in a row."""
    backoff_max_s: float = 300.0
    """Longest backoff."""
    ban_after_violations: int = 3
    """Protocol violations (within ``ban_s``) after which a peer is banned."""
    ban_s: float = 600.0
    """How long a ban lasts."""

    def __post_init__(self) -> None:
        if not self.run_id or len(self.run_id) > 128:
            raise ConfigError(f"peers.run_id must be 1..128 characters, got {self.run_id!r}")
        if self.record_ttl_s <= 0 or self.refresh_interval_s <= 0:
            raise ConfigError("peers.record_ttl_s and peers.refresh_interval_s must be > 0")
        if self.refresh_interval_s >= self.record_ttl_s:
            raise ConfigError(
                f"peers.refresh_interval_s ({self.refresh_interval_s}) must be shorter than "
                f"peers.record_ttl_s ({self.record_ttl_s}), or records lapse between refreshes"
            )
        if self.bootstrap_attempts < 1 or self.bootstrap_timeout_s <= 0:
            raise ConfigError("peers.bootstrap_attempts must be >= 1 and bootstrap_timeout_s > 0")
        if self.group_size < 2:
            raise ConfigError(f"peers.group_size must be >= 2, got {self.group_size}")
        if self.min_peers < 0 or self.min_peers_timeout_s <= 0:
            raise ConfigError("peers.min_peers must be >= 0 and peers.min_peers_timeout_s > 0")
        if self.pairing is not None and self.pairing not in PAIRINGS:
            raise ConfigError(
                f"peers.pairing must be one of {', '.join(PAIRINGS)}, got {self.pairing!r}"
            )
        if self.lag_window < 0:
            raise ConfigError(f"peers.lag_window must be >= 0, got {self.lag_window}")
        if not 0 < self.listen_share <= 1:
            raise ConfigError(f"peers.listen_share must be in (0, 1], got {self.listen_share}")
        if self.backoff_base_s <= 0 or self.backoff_max_s < self.backoff_base_s:
            raise ConfigError("peers.backoff_base_s must be > 0 and <= peers.backoff_max_s")
        if self.ban_after_violations < 1 or self.ban_s <= 0:
            raise ConfigError("peers.ban_after_violations must be >= 1 and peers.ban_s > 0")

    @property
    def records_key(self) -> str:
        """The DHT key under which every node of this run publishes its record."""
        return f"locoswarm/v1/{self.run_id}/peers"
