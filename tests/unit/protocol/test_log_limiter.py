"""The log limiter over an injected clock: one line per key per interval, then a count."""

from __future__ import annotations

import logging

import pytest

from locoswarm.protocol.ratelimit import LogLimiter


def test_one_line_per_key_per_interval_then_the_count_of_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    limit = LogLimiter(logging.getLogger("t"), interval_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="t"):
        for t in range(30):  # 30 refusals of one kind within 3 intervals
            now[0] = float(t)
            limit("malformed", "refused %s", t)
        limit("busy", "refused %s", "other")  # another key is not held back
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "refused 0",
        "refused 10 (9 more like it in the last 10s)",
        "refused 20 (9 more like it in the last 10s)",
        "refused other",
    ]
