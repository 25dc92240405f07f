"""The ``locoswarm`` console script: ``health`` without heavy imports, the rest via ``cli``."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["health"]:
        from locoswarm.node.health import main as health

        return health(args[1:])
    from locoswarm.node.cli import main as cli

    return cli(args)
