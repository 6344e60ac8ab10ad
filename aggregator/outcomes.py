"""One event per delivery: how it ended, for whoever watches (metrics, logs, ledger, status).

Every delivery the aggregator consumes ends in exactly one of three ways (``Ending``): its
effect is in the state (``applied``: folded in, buffered, or a control message acted on), it
was a ``duplicate`` of something the state already holds, or it was ``dead-lettered`` with a
reason. The delivery boundary (``aggregator.boundary``) makes one ``DeliveryEvent`` of it and
hands it to each ``Observer``.

To add an observer: a callable taking a ``DeliveryEvent``, registered with
``Observers.add``. It runs on the aggregator's thread after the outcome is settled, so it must
be quick and must not touch the broker; an exception it raises is logged and ignored (it can
never change an outcome, nor stop the daemon).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

from messages.wire.kinds import Update

log = logging.getLogger("dfl.aggregator")


class Ending(enum.Enum):
    """How a delivery ended."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"
    DEAD_LETTERED = "dead-lettered"


@dataclass(frozen=True, slots=True)
class DeliveryEvent:
    """What became of one delivery. ``party``/``seq``/``staleness`` are known for updates that
    got far enough to be read; ``reason`` and ``detail`` for dead letters."""

    ending: Ending
    queue: str
    kind: str = ""
    party: str = ""
    seq: int | None = None
    staleness: int | None = None
    reason: str = ""
    detail: str = ""
    outcome: str = ""
    """For an applied update: the strategy's word (``applied``, ``buffered``, ``discarded``)."""
    durable: bool = True
    """False for a delivery whose effect no checkpoint needs to hold (a heartbeat's lease
    renewal, a read-only query): it is acked without a checkpoint of its own
    (``Durability.handled``)."""


Observer = Callable[[DeliveryEvent], None]

UpdateStage = Callable[[Update], None]
"""A check of an update after it was decoded, validated against the federation and found
fresh, before the strategy folds it in (``Aggregator.update_stages``, run in order). To
refuse the update it raises ``InvalidMessage(reason, detail)``: the boundary dead-letters it
with that reason. It must not change any state (a later stage may still refuse the update)
and must not touch the broker; any other exception is an ``internal-error``."""


class Observers:
    """The observers of one aggregator, called in the order they were added."""

    def __init__(self) -> None:
        self._observers: list[Observer] = []

    def add(self, observer: Observer) -> None:
        self._observers.append(observer)

    def notify(self, event: DeliveryEvent) -> None:
        for observer in self._observers:
            try:
                observer(event)
            except Exception:  # an observer's bug must not change the outcome or stop us
                log.exception("observer %r failed on %s", observer, event)
