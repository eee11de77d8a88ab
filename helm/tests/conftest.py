"""Shared fixtures: each value set is rendered once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import chartlib  # noqa: E402

_cache: dict[str, chartlib.Render] = {}


def rendered(value_set: str) -> chartlib.Render:
    if value_set not in _cache:
        try:
            _cache[value_set] = chartlib.render(value_set)
        except chartlib.helm.HelmError as e:
            # One short, clear line per affected test (e.g. observability/ files missing) instead of a traceback.
            pytest.fail(f"value set {value_set!r} does not render: {e}", pytrace=False)
    return _cache[value_set]


@pytest.fixture(params=list(chartlib.VALUE_SETS), ids=list(chartlib.VALUE_SETS))
def value_set(request) -> str:
    return request.param


@pytest.fixture
def r(value_set) -> chartlib.Render:
    return rendered(value_set)
