"""Per-peer health: exponential backoff after failures, bans after repeated protocol violations.

Pure bookkeeping over an injected clock; the matchmaker asks ``available(peer, now)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from locoswarm.peers.config import PeersConfig


@dataclass(slots=True)
class _State:
    failures: int = 0
    retry_at: float = 0.0
    violations: list[float] = field(default_factory=list)
    banned_until: float = 0.0


class PeerHealth:
    """Tracks which peers to avoid, and until when."""

    def __init__(self, config: PeersConfig) -> None:
        self.config = config
        self._peers: dict[str, _State] = {}

    def _state(self, peer: str) -> _State:
        return self._peers.setdefault(peer, _State())

    def succeeded(self, peer: str) -> None:
        state = self._state(peer)
        state.failures = 0
        state.retry_at = 0.0

    def failed(self, peer: str, now: float) -> float:
        """Record a failed exchange (timeout, refusal); return when the peer may be tried again."""
        state = self._state(peer)
        state.failures += 1
        delay = min(
            self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (state.failures - 1)
        )
        state.retry_at = now + delay
        return state.retry_at

    def violated(self, peer: str, now: float) -> bool:
        """Record a protocol violation; return True when it got the peer banned."""
        state = self._state(peer)
        state.violations = [t for t in state.violations if t > now - self.config.ban_s]
        state.violations.append(now)
        self.failed(peer, now)
        if len(state.violations) >= self.config.ban_after_violations:
            state.banned_until = now + self.config.ban_s
            state.violations.clear()
            return True
        return False

    def available(self, peer: str, now: float) -> tuple[bool, str]:
        """Whether to consider ``peer`` as a partner now, and why not."""
        state = self._peers.get(peer)
        if state is None:
            return True, "ok"
        if state.banned_until > now:
            return False, f"banned for {state.banned_until - now:.0f}s more"
        if state.retry_at > now:
            return False, f"backing off for {state.retry_at - now:.1f}s more"
        return True, "ok"

    def forget_idle(self, live: set[str]) -> None:
        """Drop state of peers no longer in the swarm and not banned (bounds memory)."""
        for peer in [p for p, s in self._peers.items() if p not in live and not s.banned_until]:
            del self._peers[peer]
