"""The error boundary around every delivery the aggregator consumes.

``guard(handle, ...)`` turns a handler that may raise into one that never does (but for the two
failures that must stop or reconnect the daemon): whatever the message is and whatever a stage
raises, the delivery ends applied, duplicate or dead-lettered, and the daemon keeps consuming.

- ``InvalidMessage`` (the message is wrong): dead-lettered with its reason.
- ``BrokerError`` (the connection went away, or the broker refused us): propagates, so the
  supervisor reconnects (or stops, for a refusal); the delivery stays unacked and comes back.
- ``StateError`` (our own state cannot be kept: a checkpoint not written): propagates and
  stops the daemon with one line; a restart resumes from the last checkpoint.
- Anything else is a bug of ours that this message triggered: dead-lettered as
  ``internal-error`` with the exception's type, logged once with its traceback, counted. It
  never exits the process and never reads as a broker outage.

Handling is transactional because stages that may refuse a message (verify, decode, validate,
dedupe) change nothing; state changes only in the last stage (the strategy, a join), whose
own failures are ``StateError``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aggregator.outcomes import DeliveryEvent, Ending
from messages.errors import BrokerError, InvalidMessage, StateError
from messages.transport.broker import Broker, Delivery
from messages.transport.chunked import ChunkedBroker, ChunkSettings, chunked
from messages.wire.deadletters import INTERNAL_ERROR

log = logging.getLogger("dfl.aggregator")

Handle = Callable[[Delivery], DeliveryEvent]
Reject = Callable[[Delivery, str, str], None]
"""Dead-letter a delivery with (reason, detail)."""


def guard(handle: Handle, *, reject: Reject, notify: Callable[[DeliveryEvent], None]
          ) -> Callable[[Delivery], DeliveryEvent]:
    """``handle`` inside the boundary described in the module docstring; returns the event it
    handed to ``notify``."""

    def boundary(d: Delivery) -> DeliveryEvent:
        try:
            event = handle(d)
        except InvalidMessage as exc:
            event = dead_lettered(d, exc.reason, exc.detail, reject)
        except (BrokerError, StateError):
            raise
        except Exception as exc:  # a bug of ours: this message must not stop the federation
            log.exception("internal error handling a message from %s (dead-lettered)", d.queue)
            event = dead_lettered(d, INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"[:300],
                                  reject)
        notify(event)
        return event

    return boundary


def dead_lettered(d: Delivery, reason: str, detail: str, reject: Reject) -> DeliveryEvent:
    """Dead-letter ``d`` and say so."""
    reject(d, reason, detail)
    return DeliveryEvent(Ending.DEAD_LETTERED, d.queue, reason=reason, detail=detail)


def guarded_chunks(broker: Broker, settings: ChunkSettings, *, reject: Reject,
                   notify: Callable[[DeliveryEvent], None]) -> ChunkedBroker:
    """``broker`` with chunk reassembly whose sets that fail or stall are dead-lettered and
    reported as every other delivery is: the chunks of a big message stay unacked until it
    is whole and handled, and such a set is never applied."""
    return chunked(broker, settings,
                   reject=lambda d, exc: notify(dead_lettered(d, exc.reason, exc.detail,
                                                              reject)))
