"""Shared hypothesis settings of the property tests."""

from __future__ import annotations

from hypothesis import HealthCheck, settings


def fast(n: int = 100) -> settings:
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
