"""Durability: deliveries are acked only once a checkpoint holds their effect.

``Durability`` batches acks: each handled delivery is remembered (``handled``), and a
``commit`` writes a checkpoint of the whole state (when a checkpoint folder is set), then acks
every delivery it covers at once (``multiple=True``). So a crash at any moment loses nothing:
what the last checkpoint lacks is still unacked and the broker redelivers it, and the
``(party, seq)`` check drops what the checkpoint already holds. A commit happens every
``commit_every`` deliveries, when the caller finds it ``due`` (the oldest uncommitted change
is old enough), and whenever the caller forces one (a join, before its welcome is sent).

A checkpoint that cannot be written is ``StateError``: the daemon's own state can no longer
be kept, the one failure that stops it while it handles a message.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aggregator.checkpoint import AggregatorState, CheckpointStore
from messages.errors import StateError
from messages.transport.broker import Broker, Delivery


class Durability:
    """Ack batching and checkpoints of one aggregator (see the module docstring)."""

    def __init__(self, store: CheckpointStore | None, commit_every: int,
                 snapshot: Callable[[], AggregatorState]) -> None:
        self.store = store
        self.commit_every = commit_every
        self._snapshot = snapshot
        self.broker: Broker | None = None
        self.unacked: Delivery | None = None
        self.uncommitted = 0
        self._last: Delivery | None = None  # the last delivery handled, counted once
        self.since = 0.0  # when the oldest change not in a checkpoint happened
        self.dirty = False  # state changed by something other than a delivery

    def session(self, broker: Broker | None) -> None:
        """A new connection (or none): tags of a dead channel mean nothing any more."""
        self.broker = broker
        self.unacked, self.uncommitted, self._last = None, 0, None

    def handled(self, d: Delivery, *, durable: bool = True) -> bool:
        """``d``'s effect is in the in-memory state: ack it with the next commit. True when
        this made a commit due by count (the caller commits). Saying it twice of the same
        delivery counts once (a join is committed before its welcome, inside its handler).

        A delivery that is not ``durable`` (its effect needs no checkpoint: a heartbeat, a
        read-only query) is acked at once when no earlier delivery waits for a checkpoint
        (or is held), else with the next commit, and never makes one due: at 1,000 parties
        the heartbeats alone would otherwise cost a checkpoint of the whole model many times
        a second.
        """
        if d is self._last:
            return False
        self._last = d
        if not durable:
            if self.unacked is None and self.broker is not None:
                self.broker.ack(d, multiple=True)  # nothing before it is left unsettled
            elif self.unacked is not None:
                self.unacked = d  # rides with the next commit's cumulative ack
            return False
        self.unacked = d
        if self.uncommitted == 0:
            self.since = time.monotonic()
        self.uncommitted += 1
        return self.uncommitted >= self.commit_every

    def changed(self) -> None:
        """The state changed in a way a checkpoint must hold (a new version)."""
        if not self.dirty and not self.uncommitted:
            self.since = time.monotonic()
        self.dirty = True

    def due(self, after: float) -> bool:
        """Whether uncommitted changes are ``after`` seconds old."""
        return bool(self.uncommitted or self.dirty) and time.monotonic() - self.since >= after

    def commit(self, force: bool = False, *, hold_acks: bool = False) -> bool:
        """Checkpoint (when configured), then ack everything the checkpoint covers; True when
        a checkpoint was written.

        ``force`` also checkpoints changes no delivery caused (a version completed by a lease
        expiry), so a restart never rolls back past what parties were already sent.
        ``hold_acks`` writes the checkpoint but keeps the acks for a later commit: the broker
        then stops sending once its prefetch window is full (backpressure).
        """
        if self.unacked is None and not (force and self.dirty):
            return False
        wrote = False
        if self.store is not None:
            try:
                self.store.save(self._snapshot())
            except (OSError, ValueError, TypeError) as exc:
                raise StateError(f"cannot write a checkpoint to {self.store.directory}: {exc}; "
                                 "stopping (a restart resumes from the last one)") from exc
            wrote = True
        self.dirty = False
        if hold_acks:
            self.uncommitted = 0
            return wrote
        if self.unacked is not None and self.broker is not None:
            self.broker.ack(self.unacked, multiple=True)
        self.unacked, self.uncommitted = None, 0
        return wrote

    def mark_broadcast(self, version: int) -> None:
        """Record, before it is sent, that ``version`` is about to be broadcast
        (``CheckpointStore.mark_broadcast``)."""
        if self.store is None:
            return
        try:
            self.store.mark_broadcast(version)
        except OSError as exc:
            raise StateError(f"cannot record the broadcast version in {self.store.directory}: "
                             f"{exc}") from exc
