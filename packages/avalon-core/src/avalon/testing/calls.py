"""Counting the calls a function receives in a test, through pytest's monkeypatch."""
from __future__ import annotations


def record_calls(monkeypatch, owner, name: str) -> list:
    """Replace owner.<name> with a wrapper that appends each call's first argument to
    the returned list and calls the original; monkeypatch undoes it after the test."""
    calls: list = []
    real = getattr(owner, name)

    def recording(first, *args, **kwargs):
        calls.append(first)
        return real(first, *args, **kwargs)
    monkeypatch.setattr(owner, name, recording)
    return calls
