"""Membership leases with a fake clock."""

from __future__ import annotations

from aggregator.membership import Membership


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_party_is_active_from_join_until_its_lease_expires() -> None:
    clock = Clock()
    m = Membership(lease_seconds=10, clock=clock)
    m.join("a", 100)
    m.join("b", 50)
    clock.now = 8
    assert m.seen("a")
    clock.now = 12
    assert m.expire() == ["b"]
    assert m.active == frozenset({"a"}) and m.parties["b"].state == "expired"


def test_leave_deactivates_once_and_a_rejoin_reactivates() -> None:
    m = Membership(lease_seconds=10, clock=Clock())
    m.join("a", 1)
    assert m.leave("a") and not m.leave("a")
    assert m.active == frozenset() and m.parties["a"].state == "left"
    m.join("a", 1)
    assert m.active == frozenset({"a"})


def test_heartbeats_from_unknown_parties_are_not_membership() -> None:
    m = Membership(lease_seconds=10, clock=Clock())
    assert not m.seen("ghost") and m.active == frozenset()


def test_recorded_updates_give_the_mean_staleness() -> None:
    m = Membership(lease_seconds=10, clock=Clock())
    m.join("a", 1)
    m.record("a", 1, 0, {"loss": 0.5})
    m.record("a", 3, 2, {"loss": 0.4})
    p = m.parties["a"]
    assert p.updates == 2 and p.mean_staleness == 2.0 and p.metrics == {"loss": 0.4}
