"""Matchmaking at scale without a network: 1,024 simulated nodes whose views disagree.

Usage: python -m bench.matching [--nodes 1024] [--rounds 4] [--seed 0]
       --json bench/results/matching.json [--png bench/results/matching.png]

Every node is the real ``Matchmaker`` (``locoswarm.peers.matchmaker``), so every decision is the
real code's: its planned group, dialler and fallbacks come from ``plan_round``, each incoming
proposal is decided by ``decide_proposal`` (at most one acceptance per outer step, a refusal while
its own proposal is in flight, the lower id winning two crossed proposals, a refusal at once of a
proposal for a step whose round the node has finished), and the sequence of a
round (dial the planned group, else listen for ``listen_share`` of the deadline, then dial free
peers in the round's order, solo at the deadline) is ``Matchmaker.match`` itself. Nothing of it is
re-implemented here: that sequence exists only as async code, with no pure function to call, so
the simulation runs the async code on a virtual clock (``looptime``: sleeps and timeouts
fast-forward, so a round of realistic seconds takes milliseconds and is deterministic for a seed).

Only the world around the matchmakers is simulated, from one seeded ``random.Random``:

- the views: each node's ``list_peers()`` result misses each other record with probability
  ``miss``; with probability ``stale`` a record it holds shows the peer's outer step 1 to
  ``STALE_MAX_STEPS`` rounds ago (beyond ``lag_window`` such a peer is not a partner); a
  ``behind`` share of nodes is itself one outer step behind the swarm (another round seed, so
  another shuffle than everyone else's);
- the transport: a proposal reaches the other node's ``Matchmaker.on_proposal`` after up to
  ``LATENCY_S``, and its answer comes back as late; a ``dead`` node (its record not yet expired)
  never answers, so its dialler's deadline cuts the call off; ``clients`` are client-mode nodes
  (no address: plan_round never lets anybody dial them); the ``what-if: hold`` scenarios
  replay the code before finished rounds were refused (see ``Scenario.what_if_hold_finished``);
- arrival: nodes reach the round boundary up to ``ARRIVAL_JITTER_S`` apart.

Per round it counts pairs (planned ones and those a fallback dial formed), solo steps by reason,
refusals by reason, acceptances a dialler abandoned at its deadline, and double booking: a node
that granted two acceptances, or took part in two completed exchanges, or a dialler whose partner
does not name it back, or two client-mode nodes paired. Knows nothing of the DHT or of gRPC.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import random
import re
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import looptime

from bench.common import version as _version
from locoswarm.node.config import SyncConfig
from locoswarm.peers import Match, Matchmaker, PeerRecord, PeersConfig

RUN_ID = "bench-matching"
FIRST_STEP = 10
"""The first simulated outer step (stale records show steps before it)."""
DEADLINE_S = SyncConfig().match_deadline_s
"""Each node's matchmaking deadline, and how long a responder waits for its own round (the
daemon's default ``sync.match_deadline_s``, which it uses for both)."""
ARRIVAL_JITTER_S = 0.5
LATENCY_S = 0.2
"""The longest one hop of the transport takes."""
SILENCE_S = 3600.0
"""A dead node's call answers nothing for this long: far past every deadline."""
STALE_MAX_STEPS = 3
DEFAULT_NODES = 1024
DEFAULT_ROUNDS = 4


@dataclass(frozen=True, kw_only=True, slots=True)
class Scenario:
    """How inconsistent the views are, and who cannot take part."""

    name: str
    miss: float = 0.0
    """Chance that a node's view lacks another node's record."""
    stale: float = 0.0
    """Chance that a record in a view shows an outer step 1..STALE_MAX_STEPS rounds old."""
    behind: float = 0.0
    """Share of nodes one outer step behind the swarm."""
    clients: float = 0.0
    """Share of client-mode nodes (no address)."""
    dead: float = 0.0
    """Share of nodes that are gone while their records still show them live."""
    partial: float = 0.0
    """Share of nodes whose record only about half of the views hold (churn: records that
    appeared or expired within the round)."""
    what_if_hold_finished: bool = False
    """Not the code's behaviour, kept as the baseline: the transport holds a proposal to a node
    whose round is over until the proposer's deadline cuts it off, as ``on_proposal`` did before
    it refused a proposal for a finished step at once. (In this simulation no node's next round
    starts within that deadline, so this is exactly what the old code did here.)"""


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(name="views agree"),
    Scenario(name="1% of records in half the views", partial=0.01),
    Scenario(name="miss 5%", miss=0.05),
    Scenario(name="miss 20%", miss=0.20),
    Scenario(name="miss 20%, stale 10%, behind 10%", miss=0.20, stale=0.10, behind=0.10),
    Scenario(name="miss 5%, 25% client mode", miss=0.05, clients=0.25),
    Scenario(name="miss 5%, 5% dead", miss=0.05, dead=0.05),
    Scenario(name="what-if: hold, 1% in half the views", partial=0.01, what_if_hold_finished=True),
    Scenario(name="what-if: hold, miss 20%", miss=0.20, what_if_hold_finished=True),
)


@dataclass(frozen=True, slots=True)
class Session:
    dialler: str
    responder: str


def reason_kind(reason: str) -> str:
    """A reason with its numbers and peer ids blanked, so that reasons can be counted."""
    return re.sub(r"\d+(\.\d+)?", "#", re.sub(r"\bn\d{4,}\b", "<peer>", reason))


class Swarm:
    """Simulated nodes, each the real ``Matchmaker``, and the world around them."""

    def __init__(
        self,
        num_nodes: int,
        scenario: Scenario,
        *,
        seed: int,
        config: PeersConfig,
        deadline_s: float = DEADLINE_S,
    ) -> None:
        self.scenario = scenario
        self.config = config
        self.rng = random.Random(seed)
        self.ids = [f"n{i:04d}" for i in range(num_nodes)]
        self.clients = self._pick(scenario.clients)
        self.dead = self._pick(scenario.dead)
        self.behind = self._pick(scenario.behind)
        self.partial = self._pick(scenario.partial)
        self.deadline_s = deadline_s
        self._records: dict[tuple[str, int], PeerRecord] = {}
        clock = asyncio.get_running_loop().time
        self.nodes = {p: Matchmaker[Session](config, p, clock=clock) for p in self.ids}
        self.accepted: list[Session] = []
        """Every acceptance ``on_proposal`` granted in the current round."""
        self.refused: Counter[str] = Counter()
        self.done: set[str] = set()
        """Nodes whose ``match`` returned in the current round."""
        self.late = 0
        """Proposals that reached a node whose round was already over."""
        self.cut_off = 0
        """Proposals still undecided when the proposer's deadline cancelled them."""

    def _pick(self, share: float) -> frozenset[str]:
        return frozenset(self.rng.sample(self.ids, round(share * len(self.ids))))

    def step_of(self, peer: str, step: int) -> int:
        return step - 1 if peer in self.behind else step

    def record(self, peer: str, outer_step: int) -> PeerRecord:
        found = self._records.get((peer, outer_step))
        if found is None:
            found = self._records[peer, outer_step] = PeerRecord(
                peer_id=peer,
                address=None if peer in self.clients else f"10.0.0.1:{10000 + int(peer[1:])}",
                outer_step=outer_step,
                model_fingerprint="fp",
                sync="noloco",
                version="sim",
            )
        return found

    def view_of(self, me: str, step: int) -> list[PeerRecord]:
        """``me``'s ``list_peers()`` this round: its own record and part of the others'."""
        sc = self.scenario
        view = [self.record(me, self.step_of(me, step))]
        for peer in self.ids:
            if peer == me or self.rng.random() < sc.miss:
                continue
            if peer in self.partial and self.rng.random() < 0.5:
                continue
            shown = self.step_of(peer, step)
            if self.rng.random() < sc.stale:
                shown -= self.rng.randint(1, STALE_MAX_STEPS)
            view.append(self.record(peer, shown))
        return view

    def transport(self, me: str) -> Callable[[str, int], Awaitable[Session | None]]:
        async def propose(peer: str, outer_step: int) -> Session | None:
            await asyncio.sleep(self.rng.uniform(0, LATENCY_S))
            if peer in self.dead:
                await asyncio.sleep(SILENCE_S)  # the dialler's deadline cuts this off
                return None
            if peer in self.done:
                self.late += 1
            try:
                if peer in self.done and self.scenario.what_if_hold_finished:
                    await asyncio.sleep(SILENCE_S)  # held until the dialler's deadline
                ok, why = await self.nodes[peer].on_proposal(me, outer_step, wait_s=self.deadline_s)
            except asyncio.CancelledError:
                self.cut_off += 1
                raise
            if ok:
                self.accepted.append(Session(me, peer))
            else:
                self.refused[reason_kind(why)] += 1
            await asyncio.sleep(self.rng.uniform(0, LATENCY_S))
            return Session(me, peer) if ok else None

        return propose

    async def round(self, step: int) -> tuple[dict[str, Match[Session]], dict[str, float]]:
        """One round for every live node; returns their matches and how long each took."""
        loop = asyncio.get_running_loop()
        took: dict[str, float] = {}
        self.accepted = []
        self.refused = Counter()
        self.done = set()
        self.late = self.cut_off = 0

        async def one(peer: str) -> Match[Session]:
            await asyncio.sleep(self.rng.uniform(0, ARRIVAL_JITTER_S))
            me = self.record(peer, self.step_of(peer, step))
            began = loop.time()
            view = self.view_of(peer, step)
            match = await self.nodes[peer].match(
                me, view, self.transport(peer), deadline_s=self.deadline_s
            )
            took[peer] = loop.time() - began
            self.done.add(peer)
            return match

        async with asyncio.TaskGroup() as group:
            tasks = {p: group.create_task(one(p)) for p in self.ids if p not in self.dead}
        return {p: t.result() for p, t in tasks.items()}, took


def check_round(
    matches: dict[str, Match[Session]], accepted: list[Session], clients: frozenset[str]
) -> list[str]:
    """Every double booking (and inconsistency) in one round's outcome; empty when none."""
    problems: list[str] = []
    granted = Counter(s.responder for s in accepted)
    problems += [f"{p} accepted {n} proposals" for p, n in sorted(granted.items()) if n > 1]
    exchanges: Counter[str] = Counter()
    for peer, m in matches.items():
        if m.role != "dialler":
            continue
        exchanges[peer] += len(m.sessions)
        for partner in m.partners:
            exchanges[partner] += 1
            other = matches.get(partner)
            if other is None or other.role != "responder" or other.partners != (peer,):
                got = "nothing" if other is None else f"{other.role} {list(other.partners)}"
                problems.append(f"dialler {peer} paired with {partner}, whose match is {got}")
            if peer in clients and partner in clients:
                problems.append(f"client-mode nodes {peer} and {partner} paired")
    for peer, m in matches.items():
        if m.role == "responder" and Session(m.partners[0], peer) not in accepted:
            problems.append(f"responder {peer} names {m.partners[0]}, whom it never accepted")
    problems += [f"{p} took part in {n} exchanges" for p, n in sorted(exchanges.items()) if n > 1]
    return problems


def round_result(
    swarm: Swarm, step: int, matches: dict[str, Match[Session]], took: dict[str, float]
) -> dict[str, Any]:
    problems = check_round(matches, swarm.accepted, swarm.clients)
    diallers = [m for m in matches.values() if m.role == "dialler"]
    fallback = sum(m.reason == "a free peer accepted" for m in diallers)
    solos = Counter(reason_kind(m.reason) for m in matches.values() if m.role == "solo")
    completed = {(p, q) for p, m in matches.items() if m.role == "dialler" for q in m.sessions}
    abandoned = [s for s in swarm.accepted if (s.dialler, s.responder) not in completed]
    live = len(matches)
    return {
        "outer_step": step,
        "live_nodes": live,
        "pairs": len(diallers),
        "planned_pairs": len(diallers) - fallback,
        "fallback_pairs": fallback,
        "responders": sum(m.role == "responder" for m in matches.values()),
        "solos": sum(solos.values()),
        "paired_share": 2 * len(diallers) / live if live else 0.0,
        "solo_reasons": dict(solos.most_common()),
        "refusals": dict(swarm.refused.most_common()),
        "abandoned_acceptances": len(abandoned),
        "proposals_to_finished_nodes": swarm.late,
        "proposals_cut_off_by_deadline": swarm.cut_off,
        "client_client_pairs": sum(p in swarm.clients and q in swarm.clients for p, q in completed),
        "match_s": {
            "median": statistics.median(took.values()),
            "max": max(took.values()),
        },
        "no_double_booking": not problems,
        "problems": problems,
    }


INNER_PHASE_S = 60.0
"""Virtual seconds of training between two rounds (a GPU's inner phase is minutes): longer than
a proposer waits, so a node knows a proposal for a step it finished cannot be served."""


def simulate(
    scenario: Scenario,
    *,
    num_nodes: int,
    rounds: int,
    seed: int,
    config: PeersConfig,
    deadline_s: float = DEADLINE_S,
) -> list[dict[str, Any]]:
    """``rounds`` rounds of ``num_nodes`` matchmakers in ``scenario``, on a virtual clock.
    Deterministic for a seed; no sockets, threads or real sleeps."""

    async def main() -> list[dict[str, Any]]:
        swarm = Swarm(num_nodes, scenario, seed=seed, config=config, deadline_s=deadline_s)
        results = []
        for step in range(FIRST_STEP, FIRST_STEP + rounds):
            matches, took = await swarm.round(step)
            results.append(round_result(swarm, step, matches, took))
            await asyncio.sleep(INNER_PHASE_S)  # training between rounds (virtual time)
        return results

    loop = looptime.new_event_loop(start=0.0)
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float:
        return float(statistics.median(r[key] for r in rounds))

    solo_reasons: Counter[str] = Counter()
    for r in rounds:
        solo_reasons.update(r["solo_reasons"])
    return {
        "live_nodes": med("live_nodes"),
        "pairs": med("pairs"),
        "planned_pairs": med("planned_pairs"),
        "fallback_pairs": med("fallback_pairs"),
        "solos": med("solos"),
        "paired_share": med("paired_share"),
        "abandoned_acceptances": sum(r["abandoned_acceptances"] for r in rounds),
        "proposals_to_finished_nodes": med("proposals_to_finished_nodes"),
        "proposals_cut_off_by_deadline": med("proposals_cut_off_by_deadline"),
        "solo_reasons_all_rounds": dict(solo_reasons.most_common()),
        "match_s_max": max(r["match_s"]["max"] for r in rounds),
        "no_double_booking": all(r["no_double_booking"] for r in rounds),
    }


def plot(out: dict[str, Any], path: Path) -> None:
    """Left: each scenario's nodes by outcome. Right: how long matching took (virtual s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = out["scenarios"]
    names = [r["scenario"]["name"] for r in runs]
    xs = list(range(len(runs)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    parts = [
        ("planned pairs", lambda s: 2 * s["planned_pairs"], "tab:green"),
        ("fallback pairs", lambda s: 2 * s["fallback_pairs"], "tab:olive"),
        ("solo", lambda s: s["solos"], "tab:gray"),
    ]
    bottom = [0.0] * len(runs)
    for label, value, color in parts:
        heights = [value(r["summary"]) for r in runs]
        left.bar(xs, heights, bottom=bottom, color=color, label=f"nodes in {label}")
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    for x, r in zip(xs, runs, strict=True):
        s = r["summary"]
        mark = "" if s["no_double_booking"] else "\nDOUBLE\nBOOKED"
        left.text(
            x, bottom[x], f"{s['paired_share']:.0%}{mark}", ha="center", va="bottom", fontsize=8
        )
    booked = "none" if out["no_double_booking"] else "FOUND"
    left.set_xticks(xs, names, rotation=20, ha="right", fontsize=8)
    left.set_ylim(0, 1.12 * max(bottom))
    left.set(
        ylabel="nodes (median over rounds)",
        title=f"outcome per node, % paired (double booking: {booked})",
    )
    left.legend(fontsize=8, loc="lower left")
    left.grid(alpha=0.3, axis="y")

    for x, r in zip(xs, runs, strict=True):
        med = [rd["match_s"]["median"] for rd in r["rounds"]]
        top = [rd["match_s"]["max"] for rd in r["rounds"]]
        right.scatter([x] * len(med), med, color="tab:blue", s=12)
        right.scatter([x] * len(top), top, color="tab:red", marker="^", s=12)
    right.scatter([], [], color="tab:blue", s=12, label="median node, per round")
    right.scatter([], [], color="tab:red", marker="^", s=12, label="slowest node, per round")
    header = out["header"]
    right.axhline(header["deadline_s"], color="k", linestyle="--", label="deadline")
    right.set_xticks(xs, names, rotation=20, ha="right", fontsize=8)
    right.set(ylabel="virtual seconds in match()", title="time to a partner or a solo step")
    right.legend(fontsize=8)
    right.grid(alpha=0.3, axis="y")
    fig.suptitle(
        f"locoswarm Matchmaker, {header['nodes']} simulated nodes, {header['rounds']} rounds per "
        f"scenario (plan_round + decide_proposal, virtual time, seed {header['seed']})",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run every scenario. Returns 0, or 1 if any round double-booked a node."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--nodes", type=int, default=DEFAULT_NODES, help="simulated nodes (>= 2)")
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="rounds per scenario")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--deadline-s", type=float, default=DEADLINE_S, help="match deadline (virtual seconds)"
    )
    p.add_argument("--json", required=True, help="where to write the JSON results")
    p.add_argument("--png", default=None, help="plot path (default: the JSON path with .png)")
    a = p.parse_args(argv)
    if a.nodes < 2 or a.rounds < 1 or a.deadline_s <= 0:
        p.error("--nodes must be >= 2, --rounds >= 1 and --deadline-s > 0")
    config = PeersConfig(run_id=RUN_ID)
    started = time.perf_counter()
    out: dict[str, Any] = {
        "header": {
            "nodes": a.nodes,
            "rounds": a.rounds,
            "seed": a.seed,
            "deadline_s": a.deadline_s,
            "arrival_jitter_s": ARRIVAL_JITTER_S,
            "latency_s": LATENCY_S,
            "stale_max_steps": STALE_MAX_STEPS,
            "group_size": config.group_size,
            "lag_window": config.lag_window,
            "listen_share": config.listen_share,
            "pairing": config.pairing or "random",
            "clock": "virtual (looptime): sleeps and timeouts fast-forward",
            "versions": {"python": platform.python_version(), "looptime": _version("looptime")},
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
        "scenarios": [],
    }
    for scenario in SCENARIOS:
        began = time.perf_counter()
        rounds = simulate(
            scenario,
            num_nodes=a.nodes,
            rounds=a.rounds,
            seed=a.seed,
            config=config,
            deadline_s=a.deadline_s,
        )
        summary = summarise(rounds)
        out["scenarios"].append(
            {
                "scenario": asdict(scenario),
                "rounds": rounds,
                "summary": summary,
                "wall_s": time.perf_counter() - began,
            }
        )
        print(
            f"{scenario.name}: pairs {[r['pairs'] for r in rounds]} "
            f"(fallback {[r['fallback_pairs'] for r in rounds]}), solos "
            f"{[r['solos'] for r in rounds]}, paired {summary['paired_share']:.1%}, proposals to "
            f"finished nodes {summary['proposals_to_finished_nodes']:.0f}, slowest "
            f"{summary['match_s_max']:.2f} virtual s, no double booking: "
            f"{summary['no_double_booking']} ({time.perf_counter() - began:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
    out["no_double_booking"] = all(r["summary"]["no_double_booking"] for r in out["scenarios"])
    out["wall_s"] = time.perf_counter() - started
    json_path = Path(a.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(out, indent=1))
    png = Path(a.png) if a.png else json_path.with_suffix(".png")
    plot(out, png)
    print(f"wrote {json_path} and {png} in {out['wall_s']:.1f}s", file=sys.stderr)
    return 0 if out["no_double_booking"] else 1


if __name__ == "__main__":
    sys.exit(main())
