"""The federation at a glance: the data behind ``dfl status`` (plain, JSON-ready)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aggregator.membership import Membership


@dataclass(slots=True)
class Status:
    """A snapshot of the aggregator for progress bars, notebooks and tests."""

    version: int = -1
    released: bool = False
    updates: int = 0
    duplicates: int = 0
    discarded: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    accuracy: float | None = None
    updates_per_second: float = 0.0
    active_parties: int = 0
    checkpoints: int = 0
    finished: str | None = None
    dead_letters: int = 0
    """Messages in ``F.dead`` (read every few seconds); ``dfl dead`` lists them."""




def status_report(federation: str, strategy: str, status: Status, membership: Membership,
                  uptime: float, secure: dict[str, Any] | None = None) -> dict[str, Any]:
    """Model version, throughput, every party's state, and dead-letter counts by reason;
    with secure aggregation, ``secure_aggregation``: buffered updates, requests waiting for
    the helper and how long the oldest has waited."""
    parties = []
    for p in sorted(membership.parties.values(), key=lambda p: p.party):
        accuracy, epsilon = p.metrics.get("accuracy"), p.metrics.get("epsilon")
        parties.append({
            "party": p.party, "state": p.state,
            "last_seen_seconds": round(membership.seconds_since_seen(p.party), 1),
            "updates": p.updates, "mean_staleness": round(p.mean_staleness, 2),
            "local_accuracy": None if accuracy is None else round(accuracy, 4),
            "lag": None if p.last_base < 0 else status.version - p.last_base,
            "samples": p.num_samples, "software": p.software,
            "epsilon": epsilon,  # privacy spent, reported by a party with --dp-noise
        })
    return {
        "federation": federation, "strategy": strategy, "version": status.version,
        "released": status.released, "updates": status.updates,
        "updates_per_second": round(status.updates_per_second, 2),
        "duplicates": status.duplicates, "discarded": status.discarded,
        "dead_lettered": dict(sorted(status.rejected.items())),
        "dead_queue": status.dead_letters,
        "accuracy": status.accuracy, "checkpoints": status.checkpoints,
        "active_parties": sum(1 for p in membership.parties.values() if p.active),
        "uptime_seconds": round(uptime, 1), "finished": status.finished, "parties": parties,
        **({"secure_aggregation": secure} if secure is not None else {}),
    }
