"""Small pieces every benchmark's JSON needs: package versions and standard JSON numbers."""

from __future__ import annotations

import importlib.metadata
import math
from typing import Any


def version(dist: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def finite(obj: Any) -> Any:
    """``obj`` with non-finite floats replaced by None, so the JSON stays standard."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj
