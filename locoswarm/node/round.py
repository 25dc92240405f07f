"""One outer round of a node, straight through: label, prepare, match, exchange (a pair or a
group), finish (apply, group mean or solo). Returns a typed ``RoundOutcome``; delivering it to
the trainer and reporting it are the daemon's.

Everything that happens within one round lives in one ``_Attempt``; nothing of a round is left on
long-lived objects except the outer state, which ``OuterStep`` swaps as one value (diloco and ef
swap in their solo result when they prepare, every mode its result at the end).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from locoswarm.errors import PeerError, PeerUnavailable, ProtocolViolation
from locoswarm.faultplan import FaultPlan
from locoswarm.node.config import NodeConfig
from locoswarm.node.group import group_average, member_entry, parse_roster, shard_bounds
from locoswarm.node.handler import NodeHandler, Round
from locoswarm.node.metrics import NodeMetrics
from locoswarm.node.outer import OuterStep, Prepared
from locoswarm.node.trainer import Boundary
from locoswarm.node.view import SwarmView
from locoswarm.peers import Match, Matchmaker, PeerRecord
from locoswarm.protocol import LocalView, PeerClient, Received
from locoswarm.protocol.bytestream import StreamRoute
from locoswarm.protocol.frames import payload_bytes
from locoswarm.protocol.reasons import REASONS
from locoswarm.sync.robust import ATTACKS, Clip, poison
from locoswarm.sync.rounds import Partner

log = logging.getLogger("locoswarm.node")

REFUSALS = ("busy", "stale_round", "shutting_down", "relay_budget")
"""Reasons a peer declines an exchange without anything being wrong: no backoff."""

Result = Literal["ok", "solo", "failed", "error"]
Propose = Callable[[str, int], Awaitable[Partner | None]]


@dataclass(frozen=True, slots=True)
class RoundOutcome:
    """How one round ended."""

    round: int
    result: Result
    """ok: exchanged; solo: nobody to exchange with; failed: the exchange failed (a solo step);
    error: a fault of our own ended the exchange (a solo step, logged with its traceback)."""
    phi: Tensor
    """The new outer weights (never changed in place)."""
    partners: tuple[str, ...] = ()
    partner_rounds: tuple[int, ...] = ()
    """Each partner's round label (what a replay needs)."""
    tokens: dict[str, int] = dataclasses.field(default_factory=dict)
    """Tokens each member trained in the round, ours included (the mean's weights)."""
    seconds: float = 0.0
    distance: float | None = None
    """Relative distance to the partners' outer weights (``rounds.disagreement``); None when
    there was no exchange or its messages carried no weights."""
    clips: tuple[Clip, ...] = ()
    """A pair partner's tensors, each with its distance from ours and whether it was clipped."""
    banned: bool = False
    """The partner's clipped message got it banned."""
    path: str = "grpc"
    """The slowest path the exchange's payloads took (grpc, libp2p, relayed)."""


@dataclass(slots=True)
class _Attempt:
    """The state of one round's exchange."""

    round: int
    prepared: Prepared
    current: Round
    failed: bool = False
    """An exchange was accepted or attempted and then failed (not refused)."""
    partner: Partner | None = None
    partner_id: str = ""
    mean: Tensor | None = None
    result: Result = "solo"
    partners: tuple[str, ...] = field(default_factory=tuple)


class RoundRunner:
    """Runs a node's rounds; holds the parts a round needs, and nothing of any one round."""

    def __init__(
        self,
        *,
        config: NodeConfig,
        peer_id: str,
        outer: OuterStep,
        handler: NodeHandler,
        matchmaker: Matchmaker[Partner],
        view: SwarmView,
        client: PeerClient,
        record: PeerRecord,
        metrics: NodeMetrics,
        faults: FaultPlan,
        route: Callable[[str], str | StreamRoute | None] | None = None,
    ) -> None:
        """``route(peer)``: how to reach a partner (``Paths.route``); by default its gRPC
        address only."""
        self.route = route or view.address_of
        self.config = config
        self.peer_id = peer_id
        self.outer = outer
        self.handler = handler
        self.matchmaker = matchmaker
        self.view = view
        self.client = client
        self.record = record
        self.metrics = metrics
        self.faults = faults
        self.grouped = config.sync.group_size > 2

    async def run(self, b: Boundary) -> RoundOutcome:
        """Round ``b``: every outcome but a fault of our own before the update is a result."""
        start = time.perf_counter()
        sync = self.config.sync
        records = await self.view.refresh()
        r = self.view.catch_up(b.outer_step, self.outer)
        bad, nan = await self._round_faults(r, b.theta)
        prepared = await asyncio.to_thread(self.outer.prepare, r, b.theta, bad)
        if nan:  # a NaN in place of our message's first value
            data = payload_bytes(prepared.outgoing.payload)
            if data:
                prepared.outgoing.payload = struct.pack("<f", float("nan")) + data[4:]
        attempt = _Attempt(r, prepared, self.handler.open_round(prepared, group=self.grouped))
        try:
            async with asyncio.timeout(sync.match_deadline_s + sync.exchange_timeout_s):
                await self._exchange(attempt, records)
        except TimeoutError:
            attempt.result = "failed"
        except PeerError as exc:
            log.info("round %d: the group step failed: %s", r, exc)
            attempt.result = "failed"
        except Exception:  # our own bug: a solo step, counted and logged
            log.exception("round %d: the exchange failed on our side; taking a solo step", r)
            attempt.result, attempt.partner, attempt.mean = "error", None, None
        finally:
            self.handler.close_round()
        if self.faults.fire("apply", outer_step=r) is not None:
            raise RuntimeError(f"fault plan: an injected error before round {r}'s update")
        return await self._finish(attempt, start)

    async def _exchange(self, attempt: _Attempt, records: list[PeerRecord]) -> None:
        r, prepared = attempt.round, attempt.prepared
        me = dataclasses.replace(self.record, outer_step=r)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.view.membership.announce(me), 5)
        propose = self._join_proposer(attempt) if self.grouped else self._proposer(attempt)
        match = await self.matchmaker.match(
            me, records, propose, deadline_s=self.config.sync.match_deadline_s
        )
        if self.faults.fire("exchange", outer_step=r) is not None:
            raise RuntimeError(f"fault plan: an injected error in round {r}'s exchange")
        if match.role != "solo" or attempt.failed:
            attempt.result = "failed"  # until the exchange is done
        if self.grouped and match.role != "solo":
            attempt.mean = await self._group_step(match, attempt.current, prepared)
            group = attempt.current.group
            assert group is not None  # a group round opened a group
            attempt.partners = tuple(p for p in group.members_ids() if p != self.peer_id)
        elif match.role == "dialler":
            attempt.partner = match.sessions[match.partners[0]]
            attempt.partners = (match.partners[0],)
        elif match.role == "responder":
            attempt.partner = await attempt.current.partner
            attempt.partners = (attempt.current.responder_peer or "",)
        if attempt.partner is not None or attempt.mean is not None:
            attempt.result = "ok"

    async def _finish(self, attempt: _Attempt, start: float) -> RoundOutcome:
        outer, prepared = self.outer, attempt.prepared
        partners: tuple[str, ...] = ()
        distance = None
        clips: list[Clip] = []
        banned = False
        if attempt.result == "ok" and attempt.mean is not None:
            partners = attempt.partners
            phi, distance = await asyncio.to_thread(
                outer.apply_mean, prepared, attempt.mean, partners
            )
        elif attempt.result == "ok" and attempt.partner is not None:
            partners = attempt.partners
            phi, distance, clips = await asyncio.to_thread(
                outer.apply, prepared, attempt.partner, partners[0]
            )
            if any(c.violation for c in clips):  # repeated violations get the peer banned
                health = self.matchmaker.health
                banned = health.violated(partners[0], asyncio.get_running_loop().time())
        else:
            phi = await asyncio.to_thread(outer.solo, prepared)
        r = attempt.round
        return RoundOutcome(
            round=r,
            result=attempt.result,
            phi=phi,
            partners=partners,
            partner_rounds=tuple(outer.heard.get(p, r) for p in partners),
            tokens={self.peer_id: outer.tokens, **{p: outer.tokens_of.get(p, 0) for p in partners}},
            seconds=time.perf_counter() - start,
            distance=distance,
            clips=tuple(clips),
            banned=banned,
            path=attempt.current.path,
        )

    async def _round_faults(self, r: int, theta: Tensor) -> tuple[Tensor | None, bool]:
        """Test seam: stall or kill at a round boundary; then what our message will carry
        instead of ours: scaled, inverted or noisy weights (a bad peer), or a NaN (True)."""
        fault = self.faults.fire("round", outer_step=r)
        if fault is not None and fault.action in ("delay", "stall"):
            await asyncio.sleep(fault.seconds)
        elif fault is not None and fault.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        fault = self.faults.fire("prepare", outer_step=r)
        if fault is not None and fault.action in ATTACKS:
            return await asyncio.to_thread(poison, theta, fault.action, fault.factor, seed=r), False
        return None, fault is not None

    def _count_refusal(self, peer: str, exc: PeerError) -> None:
        """Payloads we refused as the dialler count like the ones the server refuses; a refusal
        of our call is evidence for the diagnosis (a wrong secret, version or model)."""
        if isinstance(exc, ProtocolViolation) and exc.reason in REASONS:
            self.metrics.rejected.labels(reason=exc.reason).inc()
        if self.view.diagnosis is not None:
            self.view.diagnosis.refused(peer, exc.reason)

    def _local_view(self, outer_step: int) -> LocalView:
        return LocalView(
            run_id=self.config.run_id,
            model_fingerprint=self.outer.fingerprint,
            outer_step=outer_step,
        )

    def _join_proposer(self, attempt: _Attempt) -> Propose:
        """Group proposals: an Exchange of kind ``join`` without tensors."""

        async def propose(peer: str, outer_step: int) -> Partner | None:
            route = self.route(peer)
            if route is None:
                return None
            try:
                await self.client.exchange(
                    route,
                    self.outer.control(outer_step, "join"),
                    view=self._local_view(outer_step),
                    timeout_s=self.config.sync.match_deadline_s,
                    target=peer,
                )
            except PeerError as exc:
                self._count_refusal(peer, exc)
                if exc.reason in REFUSALS:
                    return None
                attempt.failed = True
                raise
            return Partner({})  # accepted: a group exchanges no tensors here

        return propose

    def _proposer(self, attempt: _Attempt) -> Propose:
        """Pair proposals: our message; the partner's comes back checked and decoded."""
        outer = self.outer

        async def propose(peer: str, outer_step: int) -> Partner | None:
            route = self.route(peer)
            if route is None:
                return None
            decoded: list[Partner] = []

            async def check(received: Received) -> None:
                try:
                    decoded.append(await asyncio.to_thread(outer.decode, received))
                except ProtocolViolation as exc:
                    raise ProtocolViolation(
                        peer, f"payload did not decode: {exc}", reason="rejected"
                    ) from exc

            try:
                await self.client.exchange(
                    route,
                    attempt.prepared.outgoing,
                    view=self._local_view(outer_step),
                    timeout_s=self.config.sync.exchange_timeout_s,
                    check=check,
                    target=peer,
                )
            except PeerError as exc:
                log.info("exchange with %s for round %d: %s", peer, outer_step, exc)
                self._count_refusal(peer, exc)
                if exc.reason in REFUSALS:
                    return None  # a refusal, not a fault: no backoff
                attempt.failed = True
                raise  # the matchmaker backs off (or bans) the peer
            return decoded[0] if decoded else None

        return propose

    async def _group_step(
        self, match: Match[Partner], current: Round, prepared: Prepared
    ) -> Tensor:
        """Leader: send the roster; member: wait for it. Then average over the group."""
        sync, outer = self.config.sync, self.outer
        group = current.group
        assert group is not None  # a group round opened a group
        r = prepared.outer_step
        view = self._local_view(r)
        if match.role == "dialler":
            # Sorted by id: the group's mean is summed in this order, as the simulator sums it.
            roster = tuple(
                sorted(
                    (
                        member_entry(self.peer_id, self.record.address),
                        *(member_entry(p, self.view.address_of(p)) for p in match.partners),
                    )
                )
            )
            group.roster.set_result(roster)

            async def send(peer: str) -> None:
                route = self.route(peer)
                if route is not None:
                    with contextlib.suppress(PeerError):
                        await self.client.exchange(
                            route,
                            outer.control(r, "roster", roster),
                            view=view,
                            timeout_s=sync.match_deadline_s,
                            target=peer,
                        )

            await asyncio.gather(*(send(p) for p in match.partners))
        else:
            try:
                await asyncio.wait_for(asyncio.shield(group.roster), sync.match_deadline_s)
            except TimeoutError:
                raise PeerUnavailable(
                    match.partners[0], "no roster from our group's leader"
                ) from None
        roster = group.roster.result()
        ids = [p for p, _ in parse_roster(roster, None)]
        if any(p != self.peer_id and self.route(p) is None for p in ids):
            # The leader listed a member whose record is newer than our last listing: list once
            # more (bounded, as every listing is) before the swaps give up on it.
            await self.view.refresh()
        vector = await asyncio.to_thread(outer.group_vector, prepared)
        bounds = shard_bounds(vector.numel(), len(ids))
        me = ids.index(self.peer_id)

        async def swap(phase: str, peer: str, shard: Tensor) -> Tensor:
            # reduce-scatter brings back our own shard; all-gather the peer's
            lo, hi = bounds[me] if phase == "rs" else bounds[ids.index(peer)]
            got: list[Tensor] = []

            async def check(received: Received) -> None:
                got.append(await asyncio.to_thread(outer.decode_shard, received, hi - lo))

            route = self.route(peer)
            if route is None:
                raise PeerUnavailable(peer, "no route to a member of our group")
            await self.client.exchange(
                route,
                outer.shard_message(r, phase, shard, roster),
                view=view,
                timeout_s=sync.exchange_timeout_s,
                check=check,
                target=peer,
            )
            return got[0]

        return await group_average(
            group,
            self.peer_id,
            vector,
            swap,
            timeout_s=sync.exchange_timeout_s,
            shares=outer.shares,
        )
