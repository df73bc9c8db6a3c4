"""pytest fixtures for test suites of Avalon and of packages built on it.

A conftest.py takes them by importing them:

    from avalon.testing.fixtures import fresh_tuning_turn  # noqa: F401
"""
from __future__ import annotations

import pytest

from ..runtime import threads


@pytest.fixture(autouse=True)
def fresh_tuning_turn(monkeypatch):
    """Each test's compiled functions time their schedules as in a fresh process
    that never compiled them.  One compiled function times its schedules at a
    time (runtime.threads' tuning turn): a function an earlier test left in the
    middle of its trials (it raised, or the test ended) would hold the turn for
    a few more calls, and a test counting which schedule ran would see the
    waiting one.  The choices kept on disk (runtime.tuning_memo) are off: an
    earlier test, or run, of the same graph would otherwise decide which
    schedule a test's first call runs."""
    monkeypatch.setattr(threads, "_turn", threads._TuningTurn())
    monkeypatch.setenv("AVALON_TUNING_CACHE", "0")
