"""The reconnect supervisor: capped exponential backoff that resets, refusals not retried."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable

import pytest

from messages.errors import AccessRefused, ConnectionLost
from messages.transport.supervisor import supervise


def test_lost_connections_are_retried_with_growing_capped_waits() -> None:
    calls: list[float] = []

    def session(connected: Callable[[str], None]) -> None:
        calls.append(time.monotonic())
        if len(calls) < 5:
            raise ConnectionLost("broker restarting")
        connected("node")

    supervise(session, stop=threading.Event(), name="t", initial=0.05, cap=0.2)
    waits = [b - a for a, b in itertools.pairwise(calls)]
    assert len(calls) == 5
    assert waits[1] > waits[0] * 1.5  # exponential ...
    assert max(waits) < 0.35  # ... up to the cap


def test_the_backoff_starts_over_after_a_healthy_session() -> None:
    calls: list[float] = []

    def session(connected: Callable[[str], None]) -> None:
        calls.append(time.monotonic())
        if len(calls) in (1, 2, 3):
            raise ConnectionLost("flap")  # never connected: backoff grows
        if len(calls) == 4:
            connected("node")
            time.sleep(0.05)  # healthy for longer than healthy_after
            raise ConnectionLost("dropped after a healthy session")
        connected("node")

    supervise(session, stop=threading.Event(), name="t", initial=0.1, cap=5,
              healthy_after=0.01)
    assert len(calls) == 5
    assert calls[4] - calls[3] < 0.1 + 0.05  # reconnected at once, not after 0.8 s


def test_a_refusal_is_not_retried() -> None:
    calls = 0

    def session(_connected: Callable[[str], None]) -> None:
        nonlocal calls
        calls += 1
        raise AccessRefused("ACCESS_REFUSED")

    with pytest.raises(AccessRefused):
        supervise(session, stop=threading.Event(), name="t", initial=0.01)
    assert calls == 1


def test_stopping_during_a_backoff_returns_promptly() -> None:
    stop = threading.Event()

    def session(_connected: Callable[[str], None]) -> None:
        threading.Timer(0.1, stop.set).start()
        raise ConnectionLost("down")

    started = time.monotonic()
    supervise(session, stop=stop, name="t", initial=10, cap=10)
    assert time.monotonic() - started < 2
