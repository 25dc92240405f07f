"""Fault tests reuse the integration fixtures (real ``locoswarm run`` processes on 127.0.0.1)."""

from tests.integration.conftest import nodes  # noqa: F401 - re-exported fixture
