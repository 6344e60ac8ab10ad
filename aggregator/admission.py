"""Who may join, and how often: the control plane's limits (pure, injectable clock).

A join costs the aggregator a checkpoint and a full model in the welcome, and every party it
knows costs memory, checkpoint space and a metrics label. So a party id the aggregator does
not know yet is admitted only while it knows fewer than ``max_parties`` (a party that left or
expired is forgotten to make room for a new one), and joins of every kind are taken at most at
``rate`` per second (a token bucket holding ``burst``). A refused join raises
``InvalidMessage`` (``too-many-parties``, ``join-rate``): the boundary dead-letters it, and a
genuine party, whose join then times out, asks again with backoff.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aggregator.membership import Membership
from messages.errors import InvalidMessage


class Admission:
    """``admit(party, membership)`` before a join is acted on; see the module docstring."""

    def __init__(self, max_parties: int, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_parties = max_parties
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, 2 * rate)
        self._clock = clock
        self._tokens = self.burst
        self._at = clock()

    def admit(self, party: str, membership: Membership) -> None:
        """Raise ``InvalidMessage`` if ``party``'s join must be refused now; else take a
        token (and, for a new party in a full federation, forget the longest-gone one)."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            raise InvalidMessage("join-rate", f"join of {party} over {self.rate:g} joins/s; "
                                              "it will be asked again")
        if party not in membership.parties and len(membership.parties) >= self.max_parties:
            gone = [p for p in membership.parties.values() if not p.active]
            if not gone:
                raise InvalidMessage("too-many-parties", f"{party} refused: "
                                     f"{self.max_parties} parties are active (--max-parties)")
            oldest = min(gone, key=lambda p: p.last_seen)
            del membership.parties[oldest.party]
        self._tokens -= 1
