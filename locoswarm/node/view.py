"""A node's view of the swarm: the live records from the DHT, the round the swarm is at, and how
a node that is new or far behind starts from the swarm's state.

Owns the view list and the round offset (how far our round labels moved ahead of our trainer's
boundary count); nothing else writes them.
"""

from __future__ import annotations

import asyncio
import logging
import time

from locoswarm.errors import PeerError
from locoswarm.node.config import NodeConfig
from locoswarm.node.metrics import NodeMetrics
from locoswarm.node.outer import OuterStep
from locoswarm.node.trainer import Trainer
from locoswarm.peers import PeerRecord
from locoswarm.peers.membership import Membership
from locoswarm.protocol import LocalView, PeerClient
from locoswarm.tasks.inner import weights_digest

log = logging.getLogger("locoswarm.node")


class SwarmView:
    def __init__(
        self, config: NodeConfig, peer_id: str, membership: Membership, metrics: NodeMetrics
    ) -> None:
        self.config = config
        self.peer_id = peer_id
        self.membership = membership
        self.metrics = metrics
        self.records: list[PeerRecord] = []
        self.round_offset = 0
        """Global round = the trainer's boundary count + this (moves forward on catch-up)."""

    @property
    def num_peers(self) -> int:
        return max(0, len(self.records) - 1)

    async def refresh(self) -> list[PeerRecord]:
        """The live records (the last view when the DHT does not answer in time)."""
        try:
            self.records = await asyncio.wait_for(self.membership.list_peers(), 10)
        except Exception as exc:  # noqa: BLE001 - a DHT hiccup: go on with the last view
            log.warning("could not list peers: %s", exc)
        self.metrics.peers.set(self.num_peers)
        return self.records

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

    async def late_join(self, client: PeerClient, trainer: Trainer, outer: OuterStep) -> int | None:
        """Start from a live peer's outer weights and round when the swarm is already going;
        returns the round we start at (None: nobody to fetch from)."""
        records = await self._list("for a late join")
        if records is None:
            return None
        live = [r for r in self._compatible(records, outer) if r.address and r.outer_step > 0]
        for record in sorted(live, key=lambda r: -r.outer_step):
            assert record.address is not None  # filtered above
            view = LocalView(run_id=self.config.run_id, model_fingerprint=outer.fingerprint)
            try:
                state = await client.fetch_state(record.address, view=view)
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
