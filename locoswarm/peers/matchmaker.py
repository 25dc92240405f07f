"""One node's matchmaking over rounds: propose as the dialler, accept at most one proposal.

The transport is injected: ``propose(peer, outer_step)`` returns a session (accepted), None
(refused: busy, a round the peer already finished, another round; no penalty) or raises a
``PeerError`` (unreachable, timed out, misbehaved: the peer backs off, and repeated violations
get it banned). In the daemon it opens the Exchange call, whose reply frame is the acceptance;
in tests it is a call on another in-process ``Matchmaker``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from locoswarm.errors import PeerError, ProtocolViolation
from locoswarm.peers.config import PeersConfig
from locoswarm.peers.health import PeerHealth
from locoswarm.peers.pairing import ResponderState, decide_proposal, plan_round
from locoswarm.peers.records import PeerRecord

S = TypeVar("S")
Propose = Callable[[str, int], Awaitable[S | None]]


@dataclass(slots=True)
class Match(Generic[S]):
    """The outcome of one round's matchmaking."""

    outer_step: int
    role: Literal["dialler", "responder", "solo"]
    partners: tuple[str, ...]
    """The peers we exchange with (for a responder: the dialler)."""
    reason: str
    sessions: dict[str, S] = field(default_factory=dict)
    """The dialler's accepted sessions, by peer."""


class Matchmaker(Generic[S]):
    """Matchmaking state of one node. Single-threaded: use it from the node's event loop only."""

    def __init__(
        self,
        config: PeersConfig,
        peer_id: str,
        *,
        health: PeerHealth | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.peer_id = peer_id
        self.health = health or PeerHealth(config)
        self.clock = clock
        self._step: int | None = None
        self._open = False  # inside match(): proposals may be decided now
        self._finished: int | None = None  # the last step whose match() returned
        self._started_at: float | None = None  # when our last round's match() began
        self._period: float | None = None  # the time between our last two rounds' starts
        self._waiting = 0  # proposals waiting for our next round boundary
        self._matched = False
        self._dialling = False
        self._dialling_to: set[str] = set()
        self._accepted: str | None = None
        self._picked = asyncio.Event()  # an incoming proposal was accepted this round
        self._round_started = asyncio.Condition()

    # -- the responder side ------------------------------------------------------------------

    async def on_proposal(
        self,
        proposer: str,
        outer_step: int,
        *,
        wait_s: float,
        compatible: Callable[[int], bool] = lambda _ours: True,
    ) -> tuple[bool, str]:
        """Decide on a peer's proposal for ``outer_step``; wait up to ``wait_s`` for our round.
        ``compatible(our_step)`` says whether the two rounds' messages can be combined.

        Between rounds, a proposal for a step we have not reached waits for our next round; one
        for a step whose matching we finished (or passed) is refused at once when our next round
        is not expected before ``wait_s`` is over (from the time between our last two rounds),
        and waits for it otherwise (a short inner phase: our next round may still take it)."""
        deadline = self.clock() + wait_s
        hopeless = self._next_round_after(deadline)
        while True:
            ok = self.health.available(proposer, self.clock())[0]
            step = self._step if self._open else None
            if step is not None and not compatible(step):
                return False, f"outer step {outer_step} is in another phase than ours ({step})"
            mutual = self._dialling_to == {proposer} and proposer < self.peer_id
            state = ResponderState(
                step,
                self._matched,
                self._dialling,
                proposer_ok=ok,
                mutual_and_lower=mutual,
                finished_step=self._finished if hopeless else None,
            )
            accept, reason = decide_proposal(state, outer_step, self.config.lag_window)
            if accept is not None:
                break
            remaining = deadline - self.clock()
            if remaining <= 0:
                return False, reason
            self._waiting += 1
            try:
                # asyncio.timeout cancels this task itself; wait_for would run the wait in a
                # second task, and on Python 3.11 cancelling that twice can release the
                # condition's lock before it is re-taken ("Lock is not acquired").
                async with self._round_started:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(remaining):
                            await self._round_started.wait()
            finally:
                self._waiting -= 1
        if accept:
            self._matched = True
            self._accepted = proposer
            self._picked.set()
        return accept, reason

    # -- the whole round -----------------------------------------------------------------------

    async def _start(self, outer_step: int) -> None:
        self._step = outer_step
        self._open = True
        self._matched = False
        self._dialling = False
        self._accepted = None
        self._picked = asyncio.Event()
        async with self._round_started:
            self._round_started.notify_all()

    async def _dial(
        self, targets: Sequence[str], outer_step: int, propose: Propose[S]
    ) -> dict[str, S]:
        """Propose to ``targets`` at once; return the sessions of those who accepted."""
        self._dialling = True
        self._dialling_to = set(targets)
        try:
            results = await asyncio.gather(*(self._try(p, outer_step, propose) for p in targets))
        finally:
            self._dialling = False
            self._dialling_to = set()
        return {p: s for p, s in zip(targets, results, strict=True) if s is not None}

    async def _try(self, peer: str, outer_step: int, propose: Propose[S]) -> S | None:
        try:
            session = await propose(peer, outer_step)
        except ProtocolViolation:
            self.health.violated(peer, self.clock())
            return None
        except PeerError:
            self.health.failed(peer, self.clock())
            return None
        if session is not None:
            self.health.succeeded(peer)  # a transient failure long ago costs nothing now
        return session

    def _responder(self, outer_step: int) -> Match[S]:
        assert self._accepted is not None  # set together with _picked
        return Match(outer_step, "responder", (self._accepted,), "accepted a proposal")

    def _next_round_after(self, deadline: float) -> bool:
        """Whether our next round is expected to begin after ``deadline`` (one round period
        after the last began); False while no period is known."""
        if self._period is None or self._started_at is None:
            return False
        return self._started_at + self._period > deadline

    async def match(
        self,
        me: PeerRecord,
        view: Sequence[PeerRecord],
        propose: Propose[S],
        *,
        deadline_s: float,
    ) -> Match[S]:
        """Find this round's partners within ``deadline_s``, or settle for a solo step."""
        step = me.outer_step
        now = self.clock()
        if self._started_at is not None:
            self._period = now - self._started_at
        self._started_at = now
        await self._start(step)
        try:
            return await self._match(me, view, propose, deadline_s)
        finally:
            # Whatever ended the round (a match, a solo step, cancellation), no later round of
            # ours is for this step: proposals for it are refused from now on, not held.
            self._open = False
            self._finished = step

    async def _match(
        self, me: PeerRecord, view: Sequence[PeerRecord], propose: Propose[S], deadline_s: float
    ) -> Match[S]:
        step = me.outer_step
        now = self.clock()
        plan = plan_round(
            me,
            view,
            run_id=self.config.run_id,
            group_size=self.config.group_size,
            lag_window=self.config.lag_window,
            available=lambda p: self.health.available(p, now)[0],
            schedule=self.config.pairing or "random",
        )
        reason = plan.reason
        tried: set[str] = set()
        try:
            async with asyncio.timeout(deadline_s):
                if self._picked.is_set():
                    # A proposal that waited for our round was accepted when it opened: that is
                    # this round's exchange; dialling as well would make two.
                    return self._responder(step)
                if plan.role == "dial":
                    sessions = await self._dial(plan.targets, step, propose)
                    tried.update(plan.targets)
                    if sessions:
                        self._matched = True
                        return Match(step, "dialler", tuple(sessions), plan.reason, sessions)
                    reason = "no planned partner accepted"
                elif plan.fallbacks or plan.role == "listen" or self._waiting:
                    listen_s = deadline_s * self.config.listen_share
                    try:
                        await asyncio.wait_for(self._picked.wait(), listen_s)
                    except TimeoutError:
                        reason = f"no proposal within {listen_s:.1f}s"
                if self._picked.is_set():
                    return self._responder(step)
                for peer in plan.fallbacks:
                    if peer in tried or self._picked.is_set():
                        continue
                    tried.add(peer)
                    sessions = await self._dial((peer,), step, propose)
                    if sessions:
                        self._matched = True
                        return Match(step, "dialler", (peer,), "a free peer accepted", sessions)
                    if self._picked.is_set():
                        break
                if self._picked.is_set():
                    return self._responder(step)
                if plan.role == "solo" and not plan.fallbacks:
                    return self._solo(step, plan.reason)
                await self._picked.wait()  # nobody else to try: a late proposal may still come
                return self._responder(step)
        except TimeoutError:
            reason = f"{reason}; deadline of {deadline_s:.1f}s passed"
        if self._picked.is_set():
            return self._responder(step)
        return self._solo(step, reason)

    def _solo(self, outer_step: int, reason: str) -> Match[S]:
        self._matched = True  # later proposals for this step are refused
        return Match(outer_step, "solo", (), reason)
