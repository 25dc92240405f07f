"""Matchmaking at scale (``bench/matching.py``): the real ``Matchmaker`` of every simulated node,
views that disagree, a virtual clock. Invariants: nobody is in two exchanges in a round, every
dialler's partner names it back, two client-mode nodes are never paired, every live node ends the
round paired or solo within its deadline, and the same seed gives the same rounds."""

from __future__ import annotations

from typing import Any

import pytest

from bench.matching import SCENARIOS, Scenario, Session, check_round, simulate
from locoswarm.peers import Match, PeersConfig

CONFIG = PeersConfig(run_id="bench-matching")
DEADLINE_S = 10.0
SLACK_S = 1e-3


def run(scenario: Scenario, num_nodes: int, rounds: int, seed: int = 0) -> list[dict[str, Any]]:
    return simulate(
        scenario,
        num_nodes=num_nodes,
        rounds=rounds,
        seed=seed,
        config=CONFIG,
        deadline_s=DEADLINE_S,
    )


def check(rounds: list[dict[str, Any]], scenario: Scenario, num_nodes: int) -> None:
    live = num_nodes - round(scenario.dead * num_nodes)
    for r in rounds:
        assert r["no_double_booking"], r["problems"]
        assert r["live_nodes"] == live
        assert r["pairs"] == r["responders"] == r["planned_pairs"] + r["fallback_pairs"]
        assert 2 * r["pairs"] + r["solos"] == live, r
        assert r["client_client_pairs"] == 0
        assert r["match_s"]["max"] <= DEADLINE_S + SLACK_S


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_views_that_disagree_never_double_book(scenario: Scenario) -> None:
    rounds = run(scenario, num_nodes=64, rounds=2)
    check(rounds, scenario, 64)
    assert sum(r["pairs"] for r in rounds) > 0


def test_agreeing_views_pair_everyone_as_planned() -> None:
    (r,) = run(Scenario(name="views agree"), num_nodes=128, rounds=1)
    assert (r["pairs"], r["planned_pairs"], r["solos"]) == (64, 64, 0)
    assert r["refusals"] == {}


def test_the_same_seed_gives_the_same_rounds() -> None:
    scenario = Scenario(name="mixed", miss=0.2, stale=0.1, behind=0.1, clients=0.1)
    assert run(scenario, 64, 2, seed=7) == run(scenario, 64, 2, seed=7)
    assert run(scenario, 64, 1, seed=7) != run(scenario, 64, 1, seed=8)


def test_check_round_sees_double_booking() -> None:
    """The checker is not vacuous: a node in two exchanges, and two clients paired, are caught."""
    matches = {
        "a": Match(1, "dialler", ("b",), "x", {"b": Session("a", "b")}),
        "b": Match(1, "responder", ("a",), "x"),
        "c": Match(1, "dialler", ("b",), "x", {"b": Session("c", "b")}),
    }
    problems = check_round(matches, [Session("a", "b"), Session("c", "b")], frozenset({"a", "b"}))
    assert "b accepted 2 proposals" in problems
    assert "b took part in 2 exchanges" in problems
    assert "client-mode nodes a and b paired" in problems
    assert any(p.startswith("dialler c paired with b") for p in problems)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "scenario",
    [s for s in SCENARIOS if s.name in ("views agree", "miss 20%, stale 10%, behind 10%")],
    ids=lambda s: s.name,
)
def test_1024_nodes(scenario: Scenario) -> None:
    rounds = run(scenario, num_nodes=1024, rounds=1)
    check(rounds, scenario, 1024)
    if scenario.miss == 0:
        assert rounds[0]["pairs"] == 512
