"""Which ``(party, seq)`` the aggregator's state already holds: exact in any delivery order.

A party numbers its updates in increasing ``seq``, and a queue is first in, first out, so a
high-water mark per party ("drop every seq at or below the last one applied") looks enough.
It is not: the broker does not keep a queue's order for messages it takes back. When an
aggregator dies, the deliveries it held return to the queue, and a restarted (or another)
consumer can then get a party's later update before its earlier one; with a high-water mark
the earlier one is taken for a duplicate and dropped, although no state holds it. The chaos
test ``test_the_aggregator_killed_three_times...`` lost one confirmed update this way once
(``0#12884901888``: applied, the process killed before its checkpoint, never applied again,
while ``0#12884901889`` was); ``tests/test_dedupe.py`` shows RabbitMQ returning a party's
update 5 ahead of 1-4. Edge aggregators competing for one queue reorder deliveries too.

So each party keeps the exact set of its newest ``KEEP`` seqs taken, and a ``floor``: every
seq at or below it counts as taken. Only a seq pushed out of the set raises the floor, so an
update is misjudged only if ``keep`` later updates of the same party were taken before it.
Returned messages are displaced by at most the consumer's window, so the aggregator keeps
``max(KEEP, 2 * prefetch)``. Pure: no I/O; checkpointed by the caller.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping

KEEP = 64
"""Seqs remembered exactly per party (64 ints: about 2.5 KB a party in memory)."""


class AppliedSeqs:
    """The seqs taken per party (applied or discarded by the strategy: either way in the
    state, so never to be taken again)."""

    def __init__(self, keep: int = KEEP) -> None:
        self.keep = keep
        self._floor: dict[str, int] = {}
        self._recent: dict[str, list[int]] = {}  # ascending, all above the floor

    def holds(self, party: str, seq: int) -> bool:
        """Whether the state already holds ``party``'s update ``seq`` (a duplicate)."""
        if seq <= self._floor.get(party, -1):
            return True
        recent = self._recent.get(party)
        if not recent:
            return False
        i = bisect.bisect_left(recent, seq)
        return i < len(recent) and recent[i] == seq

    def add(self, party: str, seq: int) -> None:
        """Record that ``party``'s update ``seq`` is now in the state."""
        recent = self._recent.setdefault(party, [])
        if recent and seq > recent[-1]:
            recent.append(seq)  # the usual case: in order
        else:
            bisect.insort(recent, seq)
        if len(recent) > self.keep:
            self._floor[party] = recent.pop(0)

    def last(self, party: str) -> int:
        """The highest seq taken from ``party`` (-1: none): a rejoining party continues
        above it."""
        recent = self._recent.get(party)
        return recent[-1] if recent else self._floor.get(party, -1)

    def lasts(self) -> dict[str, int]:
        """``last`` of every party."""
        return {p: self.last(p) for p in self._floor.keys() | self._recent.keys()}

    # -- checkpoints -----------------------------------------------------------------------
    def state(self) -> dict[str, list[int]]:
        """For a checkpoint: per party ``[floor, *recent]``."""
        return {p: [self._floor.get(p, -1), *self._recent.get(p, [])]
                for p in self._floor.keys() | self._recent.keys()}

    @classmethod
    def restore(cls, state: Mapping[str, list[int]], last_seq: Mapping[str, int],
                keep: int = KEEP) -> AppliedSeqs:
        """From ``state()``; a party only in ``last_seq`` (a checkpoint written before exact
        dedupe) gets its high-water mark as its floor, which is what that version assumed."""
        seqs = cls(keep)
        for party, last in last_seq.items():
            if party not in state:
                seqs._floor[party] = int(last)
        for party, (floor, *recent) in state.items():
            seqs._floor[party] = int(floor)
            seqs._recent[party] = sorted(int(s) for s in recent)
        return seqs
