"""The leader's side of secure aggregation on the broker: requests out, the helper's sums in.

``SecureFedBuff`` (the strategy, pure) decides what to ask for; ``MaskCoordinator`` is the
service's seam to the helper:

- ``pump`` (every loop of the service): numbers every newly full buffer, checkpoints that
  **before** sending (a restart asks for exactly the same sets, never a new mix of the same
  updates, which the helper would refuse), and publishes each request to ``F.helper``
  (durable: a helper that is down finds it when it comes back). On a new connection every
  unanswered request is sent again; the helper answers an identical request again, so that is
  safe.
- ``handle`` (the consumer of ``F.sums``, inside the delivery boundary): checks the helper's
  signature (``helper.pub`` in ``--keys``), then unmasks and applies the buffer, or drops it
  when the helper refused (logged; it is never applied unmasked). An answer to a request
  that is no longer waiting is a duplicate.
- ``held``: while two or more requests wait, the service holds its acks (it still writes
  checkpoints), so the broker stops sending updates after ``--prefetch`` of them: a helper
  that is down makes the leader wait instead of buffering without end.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from aggregator.outcomes import DeliveryEvent, Ending
from aggregator.strategies.base import Outcome
from aggregator.strategies.secure import SecureFedBuff
from messages.errors import InvalidMessage
from messages.transport.broker import Broker, Delivery
from messages.transport.envelope import check_envelope
from messages.wire.codec import decode, encode
from messages.wire.kinds import MaskSum
from messages.wire.signing import HELPER, signature_headers

if TYPE_CHECKING:
    from aggregator.service import Aggregator

log = logging.getLogger("dfl.aggregator")


class MaskCoordinator:
    """Requests to the helper and its answers, for ``agg`` (see the module docstring)."""

    def __init__(self, agg: Aggregator, strategy: SecureFedBuff) -> None:
        self.agg = agg
        self.strategy = strategy
        self.sent_at: dict[int, float] = {}
        self.refused = 0
        """Updates dropped because the helper refused their set."""

    def warn_without_checkpoints(self) -> None:
        """The leader's seq ranges must outlive it: the helper refuses reused ones."""
        if self.agg.store is None:
            log.warning("secure aggregation without --checkpoint-dir: after a restart the "
                        "parties' seqs start again, and the helper refuses every set holding "
                        "a seq it answered before (docs/secure-aggregation.md)")

    def session(self, broker: Broker) -> None:
        """A new connection: declare the helper's queues, consume answers; every waiting
        request goes out again (``pump``)."""
        topology = self.agg.topology
        topology.declare_helper(broker)
        broker.consume(topology.helper_sums, self.agg._guarded(self.handle),
                       prefetch=self.agg.config.prefetch)
        self.sent_at.clear()

    def held(self) -> bool:
        """Whether the service should hold its acks (two or more requests unanswered)."""
        return len(self.strategy.pending) >= 2

    def pump(self, broker: Broker) -> None:
        """Number the newly full buffers (checkpointed first) and send what is unsent."""
        if self.strategy.take_requests():
            self.agg.durability.changed()
            self.agg._commit(force=True)
        for buffer in self.strategy.pending:
            assert buffer.request is not None
            if buffer.request in self.sent_at:
                continue
            body = encode(self.strategy.request_of(buffer))
            broker.publish("", self.agg.topology.helper_requests, body,
                           headers=signature_headers(self.agg._signer, body), persistent=True)
            self.sent_at[buffer.request] = time.monotonic()
            log.info("asked the helper for the masks of request %d (%d parties)",
                     buffer.request, len(buffer.slots))

    def handle(self, d: Delivery) -> DeliveryEvent:
        """One answer of the helper (see the module docstring)."""
        check_envelope(d)
        signer = self.agg._verified(d)
        if signer is not None and signer != HELPER:
            raise InvalidMessage("impersonation", f"a mask sum signed by {signer!r}, not the "
                                                  "helper")
        msg = decode(d.body, self.agg.config.max_message_bytes)
        if not isinstance(msg, MaskSum):
            raise InvalidMessage("wrong-queue", f"{msg.KIND} does not belong on "
                                                f"{self.agg.topology.helper_sums}")
        if not msg.accepted:
            dropped = self.strategy.refused(msg.request)
            if not dropped:
                return DeliveryEvent(Ending.DUPLICATE, d.queue, msg.KIND)
            self.agg.durability.changed()
            self.sent_at.pop(msg.request, None)
            self.refused += len(dropped)
            log.error("the helper refused request %d (%s): its %d updates are dropped, never "
                      "applied unmasked", msg.request, msg.reason, len(dropped))
            return DeliveryEvent(Ending.APPLIED, d.queue, msg.KIND, outcome="refused",
                                 detail=msg.reason)
        total = msg.tensors.get("sum")
        if total is None or len(msg.tensors) != 1:
            raise InvalidMessage("bad-sum", "a mask sum must hold exactly one tensor 'sum'")
        try:
            outcome = self.strategy.unmask(self.agg.weights, msg.request, total)
        except ValueError as exc:  # checked before any weight changes
            raise InvalidMessage("bad-sum", str(exc)) from None
        if outcome is not Outcome.APPLIED:
            return DeliveryEvent(Ending.DUPLICATE, d.queue, msg.KIND)
        waited = time.monotonic() - self.sent_at.pop(msg.request, time.monotonic())
        log.info("request %d unmasked after %.2f s: applied", msg.request, waited)
        self.agg._new_version()
        return DeliveryEvent(Ending.APPLIED, d.queue, msg.KIND, outcome="applied")

    def report(self) -> dict[str, Any]:
        """For ``dfl status``: buffered updates, unanswered requests and the longest wait."""
        now = time.monotonic()
        waits = [now - t for r, t in self.sent_at.items()
                 if any(b.request == r for b in self.strategy.pending)]
        return {"buffered": self.strategy.count,
                "waiting_requests": len(self.strategy.pending),
                "waiting_seconds": round(max(waits), 1) if waits else 0.0,
                "refused_updates": self.refused}
