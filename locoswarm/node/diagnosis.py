"""Misconfiguration said out loud: what a node concludes about its own setup from its peers.

Two kinds of evidence come in: records of the run that the node cannot match (their proof of the
swarm secret, model fingerprint or sync mode differ from ours), and refusals of our calls (a
wrong token, another protocol version, run or model). When more distinct peers disagree with us
for one cause than agree with us at all, the odd one out is most likely us: the node logs one
WARNING naming the cause and the fix, shows it in ``status`` and sets
``locoswarm_node_misconfigured{cause}``. Pure bookkeeping: knows nothing of gRPC or the DHT.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from locoswarm.node.metrics import CAUSES

log = logging.getLogger("locoswarm.node")

REFUSAL_CAUSES = {
    "unauthenticated": "secret",
    "fingerprint": "fingerprint",
    "version": "version",
    "wrong_run": "run",
}
"""A refusal's wire reason -> the misconfiguration it points at."""

FORGET_S = 300.0
"""A refusal counts for this long (a peer that was fixed stops counting)."""


@dataclass(frozen=True, slots=True)
class Problem:
    cause: str
    peers: int
    """Distinct peers that disagree with us for this cause."""
    message: str


class Diagnosis:
    """Evidence per cause, from the latest view of the records and recent refusals."""

    def __init__(self, *, has_secret: bool, run_id: str, version: str) -> None:
        self.has_secret = has_secret
        self.run_id = run_id
        self.version = version
        self._excluded: dict[str, set[str]] = {c: set() for c in CAUSES}
        self._refused: dict[str, dict[str, float]] = {c: {} for c in CAUSES}
        self._details: dict[str, str] = {}
        self._compatible = 0
        self._warned: set[str] = set()

    def saw_view(self, compatible: int, excluded: Iterable[tuple[str, str, str]]) -> None:
        """The records of one refresh: how many peers we can match, and (peer, cause, what
        they publish) for each one we cannot."""
        self._compatible = compatible
        for cause in CAUSES:
            self._excluded[cause] = set()
        for peer, cause, detail in excluded:
            self._excluded[cause].add(peer)
            self._details[cause] = detail

    def refused(self, peer: str, reason: str | None, *, now: float | None = None) -> None:
        """A call of ours was refused with this wire reason."""
        cause = REFUSAL_CAUSES.get(reason or "")
        if cause is not None:
            self._refused[cause][peer] = time.monotonic() if now is None else now

    def excluded(self, cause: str) -> int:
        return len(self._excluded[cause])

    def problems(self, *, now: float | None = None) -> list[Problem]:
        """The causes on which more peers disagree with us than agree with us."""
        now = time.monotonic() if now is None else now
        found = []
        for cause in CAUSES:
            recent = self._refused[cause]
            for peer in [p for p, t in recent.items() if now - t > FORGET_S]:
                del recent[peer]
            peers = len(self._excluded[cause] | set(recent))
            if peers and peers > self._compatible:
                found.append(Problem(cause, peers, self._message(cause, peers)))
        return found

    def check(self) -> list[Problem]:
        """``problems()``, logging a WARNING the first time each one shows (and again after it
        cleared and came back)."""
        problems = self.problems()
        causes = {p.cause for p in problems}
        for p in problems:
            if p.cause not in self._warned:
                log.warning("misconfiguration: %s", p.message)
        for cause in self._warned - causes:
            log.info("misconfiguration cleared: %s", cause)
        self._warned = causes
        return problems

    def _message(self, cause: str, peers: int) -> str:
        them = f"{peers} peer{'s' if peers != 1 else ''} of run {self.run_id!r}"
        detail = self._details.get(cause, "")
        if cause == "secret":
            ours = "this node has a different one" if self.has_secret else "this node has none"
            return (
                f"{them} use a swarm secret and {ours}: they refuse its calls and it trains "
                "alone. Start it with --secret-file pointing to a copy of the swarm's secret file."
            )
        if cause == "fingerprint":
            return (
                f"{them} train another model{detail}: use the swarm's --task, model settings "
                "and --sync (and --seed) so the model fingerprints match."
            )
        if cause == "sync":
            return f"{them} run another sync mode{detail}: start with the swarm's --sync."
        if cause == "version":
            return (
                f"{them} refuse our protocol version {self.version}: install the locoswarm "
                "version the swarm runs."
            )
        return f"{them} are in another run: start with the swarm's --run-id."
