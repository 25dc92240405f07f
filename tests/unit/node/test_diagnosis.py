"""The diagnosis blames this node only when more peers disagree with it than agree."""

from __future__ import annotations

import logging

import pytest

from locoswarm.node.diagnosis import FORGET_S, Diagnosis


def _diagnosis(has_secret: bool = True) -> Diagnosis:
    return Diagnosis(has_secret=has_secret, run_id="r", version="9.9")


def test_the_odd_one_out_with_another_secret_is_told_the_fix(
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = _diagnosis()
    d.saw_view(0, [(f"p{i}", "secret", "") for i in range(3)])
    with caplog.at_level(logging.INFO, "locoswarm.node"):
        first = d.check()
        again = d.check()
    assert [p.cause for p in first] == ["secret"]
    assert first[0].peers == 3
    assert "--secret-file" in first[0].message
    assert "different one" in first[0].message
    assert again == first
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # said once, not every round


def test_the_honest_majority_is_not_blamed_for_one_stranger() -> None:
    d = _diagnosis()
    d.saw_view(2, [("odd", "secret", "")])
    assert d.check() == []
    assert d.excluded("secret") == 1


def test_refusals_from_distinct_peers_count_and_are_forgotten() -> None:
    d = _diagnosis(has_secret=False)
    d.saw_view(1, [])
    d.refused("p1", "unauthenticated", now=0.0)
    assert d.problems(now=1.0) == []  # one refusal against one compatible peer
    d.refused("p1", "unauthenticated", now=1.0)  # the same peer again: still one
    assert d.problems(now=2.0) == []
    d.refused("p2", "unauthenticated", now=2.0)
    (problem,) = d.problems(now=3.0)
    assert problem.cause == "secret"
    assert "has none" in problem.message
    assert d.problems(now=3.0 + FORGET_S) == []  # stale refusals stop counting


@pytest.mark.parametrize(
    ("reason", "cause", "fix"),
    [
        ("fingerprint", "fingerprint", "--task"),
        ("version", "version", "9.9"),
        ("wrong_run", "run", "--run-id"),
    ],
)
def test_each_refusal_names_its_fix(reason: str, cause: str, fix: str) -> None:
    d = _diagnosis()
    d.refused("p1", reason, now=0.0)
    (problem,) = d.problems(now=0.0)
    assert problem.cause == cause
    assert fix in problem.message


def test_refusals_that_are_not_misconfiguration_are_ignored() -> None:
    d = _diagnosis()
    for reason in ("busy", "stale_round", None, "timeout"):
        d.refused("p1", reason, now=0.0)
    assert d.problems(now=0.0) == []


def test_a_cleared_problem_is_said_again_when_it_returns(caplog: pytest.LogCaptureFixture) -> None:
    d = _diagnosis()
    with caplog.at_level(logging.INFO, "locoswarm.node"):
        d.saw_view(0, [("p1", "sync", " (ef, ours diloco)")])
        assert d.check()[0].message.endswith("start with the swarm's --sync.")
        d.saw_view(1, [])
        assert d.check() == []
        d.saw_view(0, [("p1", "sync", "")])
        d.check()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert any("cleared" in r.getMessage() for r in caplog.records)
