"""Keeping a daemon's broker session alive: reconnect with capped exponential backoff.

A session is a function that connects, declares its topology, works, and returns when the
daemon is done. When it raises ``ConnectionLost`` (broker restart, network cut, connections
closed by an operator) it is run again after a backoff that doubles up to a cap, and resets
once a session has stayed healthy for a while, so a broker that flaps every few hours is
not met with a long wait. The cap is low (5 s by default) because an attempt costs one
TCP connect, while a high cap delays recovery by up to a whole step after the broker is
back. ``AccessRefused`` and everything else propagate: a wrong password
or a queue declared with other arguments is not fixed by retrying.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Self

from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential

from messages.errors import ConnectionLost

log = logging.getLogger("dfl.supervisor")


Connected = Callable[[str], None]
"""Called by a session once its connection and topology are up, with the broker node it
uses (its URL, password masked), which is logged: with several nodes, the one it got."""
Session = Callable[[Connected], None]


def _interruptible(stop: threading.Event, alive: Callable[[], None] | None = None
                   ) -> Callable[[float], None]:
    """A sleep that ends early when the daemon is told to stop (and that says, through
    ``alive``, that the daemon is waiting on purpose: a backoff is not a wedged loop)."""

    def sleep(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while alive is not None and not stop.is_set() and time.monotonic() < deadline:
            alive()
            stop.wait(min(0.5, deadline - time.monotonic()))
        stop.wait(max(deadline - time.monotonic(), 0.0))

    return sleep


def supervise(session: Session, *, stop: threading.Event, name: str, initial: float = 0.5,
              cap: float = 5.0, healthy_after: float = 30.0,
              alive: Callable[[], None] | None = None) -> None:
    """Run ``session`` until it returns or ``stop`` is set, reconnecting as described above.

    Logs each loss, each wait and, on recovery, how long the daemon was disconnected.
    ``alive`` is called while waiting between attempts (the daemon's liveness tick).
    """
    lost_at: list[float] = []
    connected_at: list[float] = []

    def connected(node: str) -> None:
        now = time.monotonic()
        connected_at[:] = [now]
        log.info("%s: using broker node %s", name, node)
        if lost_at:
            log.info("%s: reconnected after %.1f s", name, now - lost_at[0])
            lost_at.clear()

    def attempt() -> bool:
        connected_at.clear()
        try:
            session(connected)
            return True
        except ConnectionLost as exc:
            now = time.monotonic()
            if not lost_at:
                lost_at.append(now)
            if connected_at and now - connected_at[0] >= healthy_after:
                log.warning("%s: connection lost after a healthy session (%s); reconnecting",
                            name, exc)
                return False  # a fresh Retrying below: the backoff starts over
            raise

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning("%s: broker unavailable (%s); retrying in %.1f s", name, exc, wait)

    while not stop.is_set():
        retrying = Retrying(
            retry=retry_if_exception_type(ConnectionLost),
            wait=wait_exponential(multiplier=initial, min=initial, max=cap),
            stop=lambda _state: stop.is_set(),
            sleep=_interruptible(stop, alive),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            if retrying(attempt):
                return
        except ConnectionLost:
            if stop.is_set():
                return
            raise


class BackgroundService:
    """``run()`` in the caller's thread for a daemon; ``start()`` on a thread for notebooks.

    A failure on the background thread is kept and re-raised by ``wait()``, so a notebook
    or the one-machine launcher sees why a service stopped.
    """

    thread_name = "service"

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def run(self) -> object:
        raise NotImplementedError

    def start(self) -> Self:
        """Run the service on a background thread; returns at once."""
        self._thread = threading.Thread(target=self._run_catching, name=self.thread_name,
                                        daemon=True)
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a started service to finish; True when it has. Re-raises its error."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
        if self.error is not None:
            raise self.error
        return True

    def _run_catching(self) -> None:
        try:
            self.run()
        except BaseException as exc:
            self.error = exc
            log.error("%s stopped: %s", self.thread_name, exc)
