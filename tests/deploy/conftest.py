"""Fixtures of the deploy/ checks: Prometheus's binaries (installed from Debian when missing)."""

from __future__ import annotations

import pytest

from tests.deploy.tools import PrometheusTools, ensure_prometheus


@pytest.fixture(scope="session")
def prometheus_tools() -> PrometheusTools:
    return ensure_prometheus()
