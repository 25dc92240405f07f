"""Matchmaking over simulated, inconsistent views: in-process matchmakers, a fake transport.

The transport delivers a proposal to the other node's ``Matchmaker.on_proposal`` after a random
delay, or never (a dead node). Invariants: nobody is in two exchanges in a round, every dialler's
partners agree that they are its responders, and every node is done within its deadline.

The async tests run on virtual time (the ``looptime`` plugin): sleeps, ``asyncio.timeout`` and
``wait_for`` fast-forward the event loop's clock, and each matchmaker gets that clock, so its
health backoffs follow the same time. Deadlines and delays are realistic (seconds), the tests
take milliseconds, and a bound such as "done by the deadline" is exact and deterministic.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import pytest

from locoswarm.peers import Match, Matchmaker, PeerRecord, PeersConfig, plan_round
from locoswarm.peers.pairing import (
    ResponderState,
    cut_groups,
    decide_proposal,
    hypercube_groups,
    round_groups,
    shuffled,
)
from locoswarm.peers.records import LIBP2P

# Virtual time for the async tests of this module; the sync ones have no loop and ignore it.
pytestmark = pytest.mark.looptime

DEADLINE_S = 3.0
"""Each node's matchmaking deadline (and how long a responder waits for its round)."""
ARRIVAL_JITTER_S = 0.5
"""Nodes reach the round boundary up to this far apart."""
LATENCY_S = 0.2
"""The longest one hop of the fake transport takes."""
SILENCE_S = 3600.0
"""A dead node's call answers nothing for this long: far past anybody's deadline."""
SLACK_S = 1e-3
"""Virtual time a node may take past its deadline (the loop clock's rounding, nothing else)."""


def node(config: PeersConfig, peer_id: str) -> Matchmaker[Session]:
    """A matchmaker on the running loop's (virtual) clock, as its deadlines are."""
    return Matchmaker[Session](config, peer_id, clock=asyncio.get_running_loop().time)


def record(
    peer: str, step: int, *, client: bool = False, fp: str = "fp", libp2p: bool = False
) -> PeerRecord:
    return PeerRecord(
        peer_id=peer,
        address=None if client else f"127.0.0.1:{1000 + int(peer[1:])}",
        outer_step=step,
        model_fingerprint=fp,
        sync="noloco",
        version="t",
        capabilities=(LIBP2P,) if libp2p else (),
    )


@dataclass
class Session:
    dialler: str
    responder: str


class Swarm:
    def __init__(
        self,
        n: int,
        *,
        seed: int,
        clients: AbstractSet[int] = frozenset(),
        dead: AbstractSet[int] = frozenset(),
        group_size: int = 2,
        libp2p: bool = False,
    ) -> None:
        self.libp2p = libp2p
        self.rng = random.Random(seed)
        self.ids = [f"n{i:02d}" for i in range(n)]
        self.clients = {self.ids[i] for i in clients}
        self.dead = {self.ids[i] for i in dead}
        config = PeersConfig(
            run_id="sim", group_size=group_size, backoff_base_s=0.1, backoff_max_s=0.2
        )
        self.nodes = {p: node(config, p) for p in self.ids}
        self.took: dict[str, float] = {}
        """Virtual seconds each node's ``match`` took in the last round."""

    def view_of(self, me: str, step: int) -> list[PeerRecord]:
        # Each node misses a random ~25% of the others: views disagree.
        return [
            record(p, step, client=p in self.clients, libp2p=self.libp2p)
            for p in self.ids
            if p == me or self.rng.random() > 0.25
        ]

    def transport(self, me: str):
        async def propose(peer: str, step: int) -> Session | None:
            await asyncio.sleep(self.rng.uniform(0, LATENCY_S))
            if peer in self.dead:
                await asyncio.sleep(SILENCE_S)  # never answers; the dialler's deadline cuts it off
                return None
            accepted, _ = await self.nodes[peer].on_proposal(me, step, wait_s=DEADLINE_S)
            await asyncio.sleep(self.rng.uniform(0, LATENCY_S))
            return Session(me, peer) if accepted else None

        return propose

    async def round(self, step: int) -> dict[str, Match[Session]]:
        loop = asyncio.get_running_loop()

        async def one(peer: str) -> Match[Session]:
            await asyncio.sleep(self.rng.uniform(0, ARRIVAL_JITTER_S))  # nodes arrive apart
            me = record(peer, step, client=peer in self.clients, libp2p=self.libp2p)
            began = loop.time()
            match = await self.nodes[peer].match(
                me, self.view_of(peer, step), self.transport(peer), deadline_s=DEADLINE_S
            )
            self.took[peer] = loop.time() - began
            return match

        live = [p for p in self.ids if p not in self.dead]
        self.took = {}
        start = loop.time()
        # A task group: should a node fail, the others are cancelled here, not left to teardown.
        async with asyncio.TaskGroup() as group:
            tasks = {p: group.create_task(one(p)) for p in live}
        results = {p: task.result() for p, task in tasks.items()}
        late = {p: (t, results[p]) for p, t in self.took.items() if t > DEADLINE_S + SLACK_S}
        assert not late, late  # nobody waits past its deadline
        assert loop.time() - start <= ARRIVAL_JITTER_S + DEADLINE_S + SLACK_S
        return results


def check_round(
    results: dict[str, Match[Session]],
    clients: set[str],
    group_size: int = 2,
    *,
    libp2p: bool = False,
) -> None:
    exchanges: dict[str, int] = {p: 0 for p in results}
    for peer, match in results.items():
        if match.role == "dialler":
            assert 1 <= len(match.partners) <= group_size - 1
            for partner in match.partners:
                exchanges[peer] += 1 if partner == match.partners[0] else 0
                other = results[partner]
                assert other.role == "responder", (peer, partner)
                assert other.partners == (peer,), (peer, partner)
                exchanges[partner] += 1
                assert libp2p or not (peer in clients and partner in clients)
        elif match.role == "responder":
            (dialler,) = match.partners
            # Either the dialler holds the session, or it gave up at its deadline after we
            # accepted (in the daemon its call is cancelled and we take a solo step).
            gave_up = results[dialler].role == "solo" and "deadline" in results[dialler].reason
            assert gave_up or peer in results[dialler].partners, (peer, results[dialler])
        else:
            assert match.partners == ()
            assert match.reason
    assert all(count <= 1 for count in exchanges.values()), exchanges


@pytest.mark.parametrize("n", [2, 3, 7, 8])
async def test_inconsistent_views_never_double_book(n: int) -> None:
    swarm = Swarm(n, seed=n)
    paired = 0
    for step in range(6):
        results = await swarm.round(step)
        check_round(results, swarm.clients)
        paired += sum(m.role != "solo" for m in results.values())
    assert paired >= 6 * (n - 1) // 2  # most nodes do find partners despite the views


async def test_a_dead_partner_means_a_solo_step_or_another_partner_in_time() -> None:
    swarm = Swarm(6, seed=1, dead={0, 3})
    for step in range(4):
        check_round(await swarm.round(step), swarm.clients)


async def test_client_mode_nodes_dial_and_are_never_paired_together() -> None:
    swarm = Swarm(6, seed=2, clients={0, 1, 2})
    for step in range(4):
        results = await swarm.round(step)
        check_round(results, swarm.clients)
        for peer in swarm.clients:
            assert results[peer].role != "responder"


async def test_an_all_client_swarm_goes_solo_with_a_reason() -> None:
    swarm = Swarm(4, seed=3, clients={0, 1, 2, 3})
    results = await swarm.round(0)
    assert {m.role for m in results.values()} == {"solo"}
    assert all(
        "dialled" in m.reason or "no proposal" in m.reason or "deadline" in m.reason
        for m in results.values()
    )


@pytest.mark.parametrize("group_size", [2, 4])
async def test_nodes_without_addresses_pair_over_libp2p(group_size: int) -> None:
    """Where every node serves exchanges over libp2p, client-mode nodes pair with each other:
    the lowest id of a group without addresses dials."""
    swarm = Swarm(6, seed=2, clients={0, 1, 2, 3, 4, 5}, group_size=group_size, libp2p=True)
    paired = 0
    for step in range(4):
        results = await swarm.round(step)
        check_round(results, swarm.clients, group_size, libp2p=True)
        paired += sum(m.role != "solo" for m in results.values())
    assert paired >= 4 * 6 // 2


async def test_diloco_groups_of_four() -> None:
    swarm = Swarm(10, seed=4, group_size=4)
    for step in range(4):
        check_round(await swarm.round(step), swarm.clients, group_size=4)


async def test_a_lone_node_goes_solo_at_once() -> None:
    swarm = Swarm(1, seed=5)
    (match,) = (await swarm.round(0)).values()
    assert (match.role, match.reason) == ("solo", "no live compatible peer")
    assert swarm.took == {"n00": 0.0}  # at once: it waits for no timer at all


async def test_a_proposal_waits_for_our_round_then_is_accepted() -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    n01 = node(PeersConfig(run_id="x"), "n01")
    pending = asyncio.create_task(n01.on_proposal("n00", 3, wait_s=DEADLINE_S))
    await asyncio.sleep(1.0)
    assert not pending.done()  # still waiting for our boundary, within its wait

    async def never(peer: str, step: int) -> Session | None:
        return None

    me, other = record("n01", 3), record("n00", 3)
    match = await n01.match(me, [me, other], never, deadline_s=DEADLINE_S)
    assert await pending == (True, "ok")
    assert (match.role, match.partners) == ("responder", ("n00",))
    assert loop.time() - t0 == pytest.approx(1.0)  # accepted as our round opened, not later
    # Between rounds, a proposal for a step we have not reached waits for the next boundary
    # (here: none comes in time).
    start = loop.time()
    assert await n01.on_proposal("n02", 4, wait_s=1.5) == (False, "not at a round boundary yet")
    assert loop.time() - start == pytest.approx(1.5)  # it waited exactly its wait_s


def test_between_rounds_a_proposal_for_a_finished_step_is_refused_an_early_one_held() -> None:
    def between(finished: int | None) -> ResponderState:
        return ResponderState(None, False, False, finished_step=finished)

    over = (False, "outer step 3 is over here (our last was 3)")
    assert decide_proposal(between(3), 3, lag_window=2) == over
    assert decide_proposal(between(3), 1, lag_window=2)[0] is False  # passed, not only finished
    assert decide_proposal(between(3), 4, lag_window=2) == (None, "not at a round boundary yet")
    assert decide_proposal(between(None), 3, lag_window=2) == (None, "not at a round boundary yet")
    assert decide_proposal(ResponderState(None, False, False), 0, 2)[0] is None  # the default
    # Backoff is still checked first; during a round the step does not matter.
    bad = ResponderState(None, False, False, proposer_ok=False, finished_step=3)
    assert decide_proposal(bad, 4, 2)[0] is False
    assert decide_proposal(ResponderState(4, False, False, finished_step=3), 3, 2) == (True, "ok")


async def never(peer: str, step: int) -> Session | None:
    return None


ROUND_PERIOD_S = 60.0
"""A round period far longer than a proposer waits (a GPU's inner phase)."""


async def rounds_before(n: Matchmaker[Session], me: str, step: int) -> None:
    """Round ``step - 1`` alone, then a wait of ``ROUND_PERIOD_S`` before round ``step``: the
    node knows its rounds come that far apart."""
    await n.match(record(me, step - 1), [record(me, step - 1)], never, deadline_s=DEADLINE_S)
    await asyncio.sleep(ROUND_PERIOD_S)


async def test_a_proposal_for_a_round_we_finished_is_refused_at_once() -> None:
    loop = asyncio.get_running_loop()
    n01 = node(PeersConfig(run_id="x"), "n01")
    me = record("n01", 3)
    await rounds_before(n01, "n01", 3)
    match = await n01.match(me, [me], never, deadline_s=DEADLINE_S)
    assert match.role == "solo"
    start = loop.time()
    assert await n01.on_proposal("n00", 3, wait_s=DEADLINE_S) == (
        False,
        "outer step 3 is over here (our last was 3)",
    )
    assert (await n01.on_proposal("n02", 2, wait_s=DEADLINE_S))[0] is False  # an older step
    assert loop.time() == start  # at once: the proposers are free to try someone else
    # A proposal for the next step still waits for it, and that round still accepts one only.
    early = asyncio.create_task(n01.on_proposal("n00", 4, wait_s=DEADLINE_S))
    other = asyncio.create_task(n01.on_proposal("n02", 4, wait_s=DEADLINE_S))
    await asyncio.sleep(1.0)
    assert not early.done()
    assert not other.done()
    match = await n01.match(record("n01", 4), [me], never, deadline_s=DEADLINE_S)
    assert (match.role, match.partners) == ("responder", ("n00",))
    assert await early == (True, "ok")
    assert await other == (False, "already in an exchange this outer step")
    # Rounds 3 and 4 came 1 s apart: a proposal for step 4 now waits for round 5 (which does
    # not come) and is refused at the proposer's deadline.
    assert (await n01.on_proposal("n02", 4, wait_s=DEADLINE_S))[0] is False
    assert loop.time() == pytest.approx(start + 1.0 + DEADLINE_S)


async def test_a_cancelled_round_counts_as_finished() -> None:
    n01 = node(PeersConfig(run_id="x"), "n01")
    me, other = record("n01", 3), record("n00", 3)  # n00 dials; n01 listens
    await rounds_before(n01, "n01", 3)
    task = asyncio.create_task(n01.match(me, [me, other], never, deadline_s=DEADLINE_S))
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    start = asyncio.get_running_loop().time()
    assert (await n01.on_proposal("n00", 3, wait_s=DEADLINE_S))[0] is False
    assert asyncio.get_running_loop().time() == start  # refused at once, not held


async def test_a_dialler_refused_by_a_finished_partner_pairs_with_a_free_peer() -> None:
    loop = asyncio.get_running_loop()
    config = PeersConfig(run_id="late")  # n00's plan: dial n01, then fallbacks n01, n02
    nodes = {p: node(config, p) for p in ("n00", "n01", "n02")}

    def transport(me: str):
        async def propose(peer: str, s: int) -> Session | None:
            accepted, _ = await nodes[peer].on_proposal(me, s, wait_s=DEADLINE_S)
            return Session(me, peer) if accepted else None

        return propose

    n01 = record("n01", 3)
    await rounds_before(nodes["n01"], "n01", 3)
    await nodes["n01"].match(n01, [n01], never, deadline_s=DEADLINE_S)  # solo, done for step 3
    view = [record(p, 3) for p in ("n00", "n01", "n02")]
    t0 = loop.time()
    # n02 sees only n00 (views disagree) and listens for it.
    m00, m02 = await asyncio.gather(
        nodes["n00"].match(view[0], view, transport("n00"), deadline_s=DEADLINE_S),
        nodes["n02"].match(view[2], [view[0], view[2]], transport("n02"), deadline_s=DEADLINE_S),
    )
    # Before: n01 held n00's proposal to n00's deadline, and both went solo.
    assert (m00.role, m00.partners, m00.reason) == ("dialler", ("n02",), "a free peer accepted")
    assert (m02.role, m02.partners) == ("responder", ("n00",))
    assert loop.time() == t0  # no timer ran out on the way


async def test_proposals_are_decided_against_the_lag_window() -> None:
    config = PeersConfig(run_id="x", lag_window=2)
    n01 = node(config, "n01")
    late = asyncio.create_task(n01.on_proposal("n00", 1, wait_s=DEADLINE_S))
    close = asyncio.create_task(n01.on_proposal("n02", 4, wait_s=DEADLINE_S))
    await asyncio.sleep(0.5)

    async def never(peer: str, step: int) -> Session | None:
        return None

    me = record("n01", 5)
    match = await n01.match(me, [me], never, deadline_s=DEADLINE_S)
    assert (await late)[0] is False  # 4 rounds behind: outside the window
    assert await close == (True, "ok")  # 1 round behind: partners meet at their own boundaries
    assert (match.role, match.partners) == ("responder", ("n02",))


async def test_two_nodes_dialling_each_other_at_once_still_pair() -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    config = PeersConfig(run_id="x", listen_share=0.25)
    a = node(config, "n00")
    b = node(config, "n01")
    nodes = {"n00": a, "n01": b}

    def transport(me: str):
        async def propose(peer: str, step: int) -> Session | None:
            accepted, _ = await nodes[peer].on_proposal(me, step, wait_s=10.0)
            return Session(me, peer) if accepted else None

        return propose

    view = [record("n00", 0), record("n01", 0)]

    async def late_a() -> Match[Session]:
        await asyncio.sleep(2.0)  # b listens 1 s, then dials a, which is still training
        return await a.match(view[0], view, transport("n00"), deadline_s=10.0)

    match_a, match_b = await asyncio.gather(
        late_a(), b.match(view[1], view, transport("n01"), deadline_s=4.0)
    )
    # a dialled b while b's own proposal to a waited: the lower id's proposal wins
    assert (match_a.role, match_a.partners) == ("dialler", ("n01",))
    assert (match_b.role, match_b.partners) == ("responder", ("n00",))
    assert loop.time() - t0 == pytest.approx(2.0)  # paired the moment a arrived


# -- the round's groups as pure functions (peers/pairing.py) -----------------------------------


def _ids(n: int) -> list[str]:
    return [f"n{i:02d}" for i in range(n)]


def _flat(groups: list[tuple[str, ...]]) -> list[str]:
    return sorted(p for g in groups for p in g)


@pytest.mark.parametrize("step", [0, 1, 2, 3, 7, 1001])
def test_hypercube_pairs_rank_i_with_i_xor_two_to_the_step(step: int) -> None:
    ids = _ids(8)
    groups = hypercube_groups(ids, "run", step)
    bit = 1 << (step % 3)
    assert len(groups) == 4
    assert all(len(g) == 2 for g in groups)
    assert _flat(groups) == ids
    partner = {a: b for x, y in groups for a, b in ((x, y), (y, x))}
    for i, peer in enumerate(ids):
        assert partner[peer] == ids[i ^ bit], (step, peer)


def test_hypercube_partners_cycle_through_every_dimension() -> None:
    ids = _ids(8)
    seen: dict[str, set[str]] = {p: set() for p in ids}
    for step in range(3):
        for a, b in hypercube_groups(ids, "run", step):
            seen[a].add(b)
            seen[b].add(a)
    # Three rounds: every node met its three cube neighbours, each once.
    assert seen["n00"] == {"n01", "n02", "n04"}
    assert all(len(partners) == 3 for partners in seen.values())
    assert hypercube_groups(ids, "run", 3) == hypercube_groups(ids, "run", 0)


def test_hypercube_ranks_come_from_sorted_ids_not_the_given_order() -> None:
    ids = ["zed", "amy", "kim", "bob"]
    groups = hypercube_groups(ids, "run", 0)
    assert groups == [("amy", "bob"), ("kim", "zed")]  # ranks 0-1 and 2-3
    shuffled_ids = [*ids[::-1], "amy"]  # order and duplicates do not matter
    assert hypercube_groups(shuffled_ids, "run", 0) == groups
    assert hypercube_groups(ids, "run", 1) == [("amy", "kim"), ("bob", "zed")]


def test_shuffled_hypercube_sweeps_the_cube_with_new_neighbours_each_sweep() -> None:
    ids = _ids(8)
    sweeps = []
    for sweep in range(4):
        met: dict[str, set[str]] = {p: set() for p in ids}
        for step in range(3 * sweep, 3 * sweep + 3):
            groups = round_groups(ids, "run", step, 2, "hypercube-shuffled")
            assert _flat(groups) == ids
            assert all(len(g) == 2 for g in groups)
            for a, b in groups:
                met[a].add(b)
                met[b].add(a)
        # Each sweep is a cube: three distinct partners each, and all eight reachable in 3 hops.
        assert all(len(partners) == 3 for partners in met.values())
        sweeps.append(frozenset((p, frozenset(q)) for p, q in met.items()))
    assert len(set(sweeps)) > 1  # the labels were drawn again
    # The first round of two different sweeps (the same dimension) pairs differently.
    firsts = {tuple(round_groups(ids, "run", 3 * s, 2, "hypercube-shuffled")) for s in range(4)}
    assert len(firsts) > 1
    # Every node computes the same groups, whatever order it lists its view in.
    assert round_groups(ids[::-1], "run", 5, 2, "hypercube-shuffled") == round_groups(
        ids, "run", 5, 2, "hypercube-shuffled"
    )


def test_hypercube_with_six_nodes_pairs_the_ranks_left_over_at_random() -> None:
    ids = _ids(6)  # d = 3; ranks 4 and 5 have no partner along dimensions 1 and 2
    assert hypercube_groups(ids, "run", 0) == [("n00", "n01"), ("n02", "n03"), ("n04", "n05")]
    one = hypercube_groups(ids, "run", 1)
    assert one[:2] == [("n00", "n02"), ("n01", "n03")]
    assert sorted(one[2]) == ["n04", "n05"]
    two = hypercube_groups(ids, "run", 2)
    assert two[:2] == [("n00", "n04"), ("n01", "n05")]
    assert sorted(two[2]) == ["n02", "n03"]
    for step in range(6):  # everybody is paired every round
        groups = hypercube_groups(ids, "run", step)
        assert _flat(groups) == ids
        assert all(len(g) == 2 for g in groups)


@pytest.mark.parametrize("n", [3, 5, 7])
def test_hypercube_with_an_odd_count_leaves_exactly_one_node_alone(n: int) -> None:
    ids = _ids(n)
    for step in range(6):
        groups = hypercube_groups(ids, "run", step)
        assert _flat(groups) == ids
        assert sorted(len(g) for g in groups) == [1] + [2] * (n // 2)


def test_hypercube_leftovers_follow_the_rounds_seeded_shuffle() -> None:
    ids = _ids(5)  # step 2 (mod 3): ranks 1, 2, 3 have no partner (1^4, 2^4, 3^4 >= 5)
    groups = hypercube_groups(ids, "run", 2)
    assert groups[0] == ("n00", "n04")
    assert groups[1:] == cut_groups(shuffled(["n01", "n02", "n03"], "run", 2), 2)
    # Deterministic for (run, step) ...
    assert hypercube_groups(ids, "run", 2) == groups
    # ... and the shuffle differs between runs for some step.
    assert any(
        hypercube_groups(ids, "run", s) != hypercube_groups(ids, "other", s)
        for s in range(2, 30, 3)
    )


def test_hypercube_with_fewer_than_two_nodes() -> None:
    assert hypercube_groups([], "run", 0) == []
    assert hypercube_groups(["a"], "run", 5) == [("a",)]
    assert hypercube_groups(["b", "a"], "run", 7) == [("a", "b")]


def test_round_groups_picks_the_schedule() -> None:
    ids = _ids(8)
    assert round_groups(ids, "run", 4, 2, "hypercube") == hypercube_groups(ids, "run", 4)
    assert round_groups(ids, "run", 4, 2) == cut_groups(shuffled(ids, "run", 4), 2)
    assert round_groups(ids, "run", 4, 2, "random") == round_groups(ids, "run", 4, 2)
    assert round_groups(ids, "run", 4, 2, "hypercube") != round_groups(ids, "run", 4, 2)
    # The hypercube pairs nodes; groups of another size keep the shuffle.
    assert round_groups(ids, "run", 4, 4, "hypercube") == cut_groups(shuffled(ids, "run", 4), 4)


def test_plan_round_follows_the_hypercube_and_every_node_agrees() -> None:
    ids = _ids(8)
    view = [record(p, 2) for p in ids]
    plans = {
        p: plan_round(
            record(p, 2), view, run_id="run", group_size=2, lag_window=1, schedule="hypercube"
        )
        for p in ids
    }
    want = hypercube_groups(ids, "run", 2)  # bit 4: n00-n04, n01-n05, ...
    for p, plan in plans.items():
        group = next(g for g in want if p in g)
        assert plan.group == group
        assert plan.role == ("dial" if p == group[0] else "listen")


async def test_matchmaker_with_hypercube_pairing_forms_the_cube_pairs() -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    config = PeersConfig(run_id="cube", pairing="hypercube", backoff_base_s=0.1)
    ids = _ids(4)
    nodes = {p: node(config, p) for p in ids}
    step = 1  # bit 2: n00-n02, n01-n03
    view = [record(p, step) for p in ids]

    def transport(me: str):
        async def propose(peer: str, s: int) -> Session | None:
            accepted, _ = await nodes[peer].on_proposal(me, s, wait_s=DEADLINE_S)
            return Session(me, peer) if accepted else None

        return propose

    matches = await asyncio.gather(
        *(nodes[p].match(record(p, step), view, transport(p), deadline_s=DEADLINE_S) for p in ids)
    )
    assert loop.time() == t0  # views agree: the pairs form without waiting for any timeout
    got = {p: (m.role, m.partners) for p, m in zip(ids, matches, strict=True)}
    assert got == {
        "n00": ("dialler", ("n02",)),
        "n01": ("dialler", ("n03",)),
        "n02": ("responder", ("n00",)),
        "n03": ("responder", ("n01",)),
    }


async def test_with_short_rounds_a_proposal_for_a_finished_step_waits_for_the_next() -> None:
    """Rounds that come faster than a proposer waits (a short inner phase): a proposal for the
    step we just finished is held, and our next round (within the lag window) takes it."""
    n01 = node(PeersConfig(run_id="x"), "n01")
    await n01.match(record("n01", 2), [record("n01", 2)], never, deadline_s=DEADLINE_S)
    await asyncio.sleep(1.0)
    await n01.match(record("n01", 3), [record("n01", 3)], never, deadline_s=DEADLINE_S)
    held = asyncio.create_task(n01.on_proposal("n00", 3, wait_s=DEADLINE_S))
    await asyncio.sleep(0.5)
    assert not held.done()
    match = await n01.match(record("n01", 4), [record("n01", 4)], never, deadline_s=DEADLINE_S)
    assert (match.role, match.partners) == ("responder", ("n00",))
    assert await held == (True, "ok")
