"""Who takes part: parties join, renew a lease with heartbeats, and leave or expire.

Pure bookkeeping with an injectable clock, so leases are tested without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class Party:
    """What the aggregator knows about one party."""

    party: str
    num_samples: int
    joined_at: float
    last_seen: float
    state: str = "active"
    """``active``, ``left`` (said goodbye) or ``expired`` (lease ran out)."""
    updates: int = 0
    staleness_sum: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    last_base: int = -1
    software: str = ""

    @property
    def active(self) -> bool:
        return self.state == "active"

    @property
    def mean_staleness(self) -> float:
        return self.staleness_sum / self.updates if self.updates else 0.0


class Membership:
    """Parties by id; a party is active from its join until it leaves or its lease expires."""

    def __init__(self, lease_seconds: float, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.lease_seconds = lease_seconds
        self._clock = clock
        self.parties: dict[str, Party] = {}

    def join(self, party: str, num_samples: int, software: str = "") -> Party:
        """Register (or re-register after a restart or an expired lease) a party."""
        now = self._clock()
        p = self.parties.get(party)
        if p is None:
            p = self.parties[party] = Party(party, num_samples, now, now)
        p.num_samples, p.last_seen, p.state, p.software = num_samples, now, "active", software
        return p

    def seen(self, party: str) -> bool:
        """Renew the lease of a known party (heartbeat or update); False if unknown."""
        p = self.parties.get(party)
        if p is None:
            return False
        p.last_seen = self._clock()
        p.state = "active"
        return True

    def leave(self, party: str) -> bool:
        """Mark a party gone; True if that changed the active set."""
        p = self.parties.get(party)
        if p is None or not p.active:
            return False
        p.state = "left"
        return True

    def expire(self) -> list[str]:
        """Deactivate parties whose lease ran out; returns their ids."""
        deadline = self._clock() - self.lease_seconds
        gone = [p.party for p in self.parties.values() if p.active and p.last_seen < deadline]
        for party in gone:
            self.parties[party].state = "expired"
        return gone

    def record(self, party: str, staleness: int, base: int, metrics: dict[str, float]) -> None:
        """Count an applied (or buffered) update of ``party``."""
        p = self.parties[party]
        p.updates += 1
        p.staleness_sum += staleness
        p.last_base = base
        p.metrics = metrics

    def seconds_since_seen(self, party: str) -> float:
        return self._clock() - self.parties[party].last_seen

    @property
    def active(self) -> frozenset[str]:
        return frozenset(p.party for p in self.parties.values() if p.active)
