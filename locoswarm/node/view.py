"""A node's view of the swarm: the live records from the DHT, the round the swarm is at, and how
a node that is new or far behind starts from the swarm's state.

Owns the view list and the round offset (how far our round labels moved ahead of our trainer's
boundary count); nothing else writes them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from locoswarm.errors import PeerError
from locoswarm.node.config import NodeConfig
from locoswarm.node.diagnosis import Diagnosis
from locoswarm.node.metrics import CAUSES, NodeMetrics
from locoswarm.node.outer import OuterStep
from locoswarm.node.trainer import Trainer
from locoswarm.peers import PeerRecord
from locoswarm.peers.membership import Membership
from locoswarm.peers.records import secret_proof
from locoswarm.protocol import LocalView, PeerClient
from locoswarm.protocol.bytestream import StreamRoute
from locoswarm.tasks.inner import weights_digest

log = logging.getLogger("locoswarm.node")


class SwarmView:
    def __init__(
        self,
        config: NodeConfig,
        peer_id: str,
        membership: Membership,
        metrics: NodeMetrics,
        *,
        secret: bytes | None = None,
        diagnosis: Diagnosis | None = None,
    ) -> None:
        self.config = config
        self.peer_id = peer_id
        self.membership = membership
        self.metrics = metrics
        self.secret = secret
        self.diagnosis = diagnosis
        self.fingerprint: str | None = None
        """Our model's fingerprint, once the model is built (records that differ are not
        counted as peers)."""
        self.records: list[PeerRecord] = []
        """The live records we may match (ours included): those proving our swarm secret."""
        self.round_offset = 0
        """Global round = the trainer's boundary count + this (moves forward on catch-up)."""
        self._matchable = 0

    @property
    def num_peers(self) -> int:
        """Live peers we can exchange with (same secret, model and sync mode)."""
        return self._matchable

    def proof(self, peer_id: str) -> str | None:
        """What a record of ``peer_id`` must carry to prove our swarm secret (None: no secret)."""
        if self.secret is None:
            return None
        return secret_proof(self.secret, self.config.run_id, peer_id)

    async def refresh(self) -> list[PeerRecord]:
        """The live records we may match (the last view when the DHT does not answer in time).
        Records without our secret's proof are left out; what we leave out, and why, goes to
        the diagnosis and the ``locoswarm_peers_excluded`` gauge."""
        try:
            listed = await asyncio.wait_for(self.membership.list_peers(), 10)
        except Exception as exc:  # noqa: BLE001 - a DHT hiccup: go on with the last view
            log.warning("could not list peers: %s", exc)
        else:
            self._sort(listed)
        self.metrics.peers.set(self.num_peers)
        return self.records

    def _sort(self, listed: list[PeerRecord]) -> None:
        mode = self.config.sync.mode
        keep: list[PeerRecord] = []
        excluded: list[tuple[str, str, str]] = []
        for r in listed:
            if r.peer_id == self.peer_id:
                keep.append(r)
            elif r.secret_proof != self.proof(r.peer_id):
                excluded.append((r.peer_id, "secret", ""))
            elif self.fingerprint is not None and r.model_fingerprint != self.fingerprint:
                keep.append(r)
                excluded.append(
                    (r.peer_id, "fingerprint", f" (fingerprint {r.model_fingerprint[:16]})")
                )
            elif r.sync != mode:
                keep.append(r)
                excluded.append((r.peer_id, "sync", f" ({r.sync}, ours {mode})"))
            else:
                keep.append(r)
        self.records = keep
        self._matchable = len(keep) - sum(r.peer_id == self.peer_id for r in keep)
        self._matchable -= sum(1 for _, cause, _ in excluded if cause != "secret")
        for cause in CAUSES:
            self.metrics.excluded.labels(cause=cause).set(
                sum(1 for _, c, _ in excluded if c == cause)
            )
        if self.diagnosis is not None:
            self.diagnosis.saw_view(self._matchable, excluded)

    def record_of(self, peer: str) -> PeerRecord | None:
        return next((r for r in self.records if r.peer_id == peer), None)

    def address_of(self, peer: str) -> str | None:
        record = self.record_of(peer)
        return None if record is None else record.address

    def _compatible(self, records: list[PeerRecord], outer: OuterStep) -> list[PeerRecord]:
        return [
            r
            for r in records
            if r.peer_id != self.peer_id
            and r.model_fingerprint == outer.fingerprint
            and r.sync == outer.mode
            and r.secret_proof == self.proof(r.peer_id)
        ]

    def _swarm_round(self, records: list[PeerRecord], outer: OuterStep) -> int | None:
        """The median round of the compatible peers (None: none seen)."""
        steps = sorted(r.outer_step for r in self._compatible(records, outer))
        return steps[len(steps) // 2] if steps else None

    def catch_up(self, boundary: int, outer: OuterStep) -> int:
        """This round's label: our own count, moved forward to the swarm's median when we fell
        behind (a late joiner, a slow node). Round numbers are labels that let partners meet;
        the maths does not depend on them, and they never go backward."""
        r = boundary + self.round_offset
        swarm = self._swarm_round(self.records, outer)
        if swarm is not None and swarm > r:
            log.info("round %d: the swarm is at round %d; catching up", r, swarm)
            self.round_offset += swarm - r
            r = swarm
        return r

    async def wait_for_peers(self, outer: OuterStep, stop: asyncio.Event) -> None:
        """Hold the first round until ``peers.min_peers`` compatible nodes are live (bounded)."""
        want = self.config.peers.min_peers
        if want <= 0:
            return
        deadline = time.monotonic() + self.config.peers.min_peers_timeout_s
        while time.monotonic() < deadline and not stop.is_set():
            seen = [
                r
                for r in await self.refresh()
                if r.peer_id != self.peer_id and r.model_fingerprint == outer.fingerprint
            ]
            if len(seen) >= want:
                log.info("%d peers are live: starting", len(seen))
                return
            await asyncio.sleep(0.5)
        log.warning(
            "fewer than %d peers after %.0fs: starting anyway",
            want,
            self.config.peers.min_peers_timeout_s,
        )

    async def _list(self, why: str) -> list[PeerRecord] | None:
        try:
            return await asyncio.wait_for(self.membership.list_peers(), 15)
        except (TimeoutError, Exception) as exc:  # noqa: BLE001 - the DHT is best effort here
            log.warning("could not list peers %s: %s", why, exc)
            return None

    async def far_behind(self, next_round: int, outer: OuterStep) -> bool:
        """Whether the swarm moved past our restored checkpoint by more than the lag window:
        then its current state is worth more than ours (a late joiner's start)."""
        records = await self._list("to compare rounds")
        swarm = None if records is None else self._swarm_round(records, outer)
        window = self.config.peers.lag_window
        if swarm is None or swarm - next_round <= window:
            return False
        log.warning(
            "the swarm is at round %d, our checkpoint at round %d (more than the lag window of "
            "%d behind): fetching the swarm's current state instead",
            swarm,
            next_round,
            window,
        )
        return True

    async def late_join(
        self,
        client: PeerClient,
        trainer: Trainer,
        outer: OuterStep,
        route_to: Callable[[PeerRecord], str | StreamRoute | None] | None = None,
    ) -> int | None:
        """Start from a live peer's outer weights and round when the swarm is already going;
        returns the round we start at (None: nobody to fetch from). ``route_to``: how to reach
        a peer (``Paths.route_to``: a node without an address over libp2p); by default its gRPC
        address only."""
        records = await self._list("for a late join")
        if records is None:
            return None
        reach = route_to or (lambda r: r.address)
        routes = {r.peer_id: reach(r) for r in self._compatible(records, outer)}
        live = [
            r
            for r in self._compatible(records, outer)
            if routes[r.peer_id] is not None and r.outer_step > 0
        ]
        state_bytes = 2 * 4 * outer.phi.numel()  # phi and momentum, fp32
        for record in sorted(live, key=lambda r: (r.address is None, -r.outer_step)):
            route = routes[record.peer_id]
            assert route is not None  # filtered above
            view = LocalView(run_id=self.config.run_id, model_fingerprint=outer.fingerprint)
            try:
                state = await client.fetch_state(
                    route, view=view, target=record.peer_id, expect_bytes=state_bytes
                )
                await asyncio.to_thread(outer.load_state_payload, state)
            except PeerError as exc:
                log.warning("could not fetch state from %s: %s", record.peer_id, exc)
                continue
            await asyncio.to_thread(trainer.set_weights, outer.phi)
            start = state.header.outer_step
            self.round_offset = 0
            trainer.step = start * self.config.sync.inner_steps
            log.info(
                "late join: fetched the outer weights of round %d from %s (phi %s)",
                start,
                record.peer_id,
                await asyncio.to_thread(weights_digest, outer.phi),
            )
            return start
        return None
