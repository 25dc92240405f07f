"""Named starting points for a node's config (``locoswarm run --preset NAME``).

A preset is a function returning dotted config keys; it sits above the defaults and below the
TOML file, the environment and the flags, so anything it sets can still be overridden. Tests and
benchmarks start nodes from presets instead of carrying their own lists of flags.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from locoswarm.errors import ConfigError


def fast_failure_detection() -> dict[str, Any]:
    """Notice a dead or hung peer within seconds (loopback swarms: the fault suite, the soak).

    The defaults suit the internet, where a slow peer is not a dead one: frames may take 30 s
    and an exchange two minutes.
    """
    return {
        "protocol.frame_timeout_s": 2.0,
        "protocol.keepalive_s": 1.0,
        "protocol.ping_timeout_s": 2.0,
        "protocol.max_reconnect_backoff_s": 1.0,
        "sync.exchange_timeout_s": 8.0,
        "peers.backoff_base_s": 0.5,
        "peers.backoff_max_s": 2.0,
    }


PRESETS: dict[str, Callable[[], dict[str, Any]]] = {
    "fast-failure-detection": fast_failure_detection,
}


def preset(name: str) -> dict[str, Any]:
    """The dotted keys of preset ``name`` (ConfigError naming the known ones otherwise)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
