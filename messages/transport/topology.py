"""Queue and exchange names of one federation, and their declaration.

Every name is prefixed by the federation id ``F`` so several federations share a vhost:

- ``F.in``       direct exchange, the parties' only way in: routing key ``F.updates`` or
  ``F.control`` reaches the queue of that name. Parties get write permission on this
  exchange alone, never on the default exchange (which reaches every queue by name).
- ``F.updates``  durable queue (quorum by default), parties -> aggregator, dead-letters to
  ``F.dead``; optional max length with ``reject-publish`` (backpressure).
- ``F.control``  durable queue for join (RPC) / leave / heartbeat, dead-letters to ``F.dead``.
- ``F.models``   fanout exchange, aggregator -> parties; each party binds its own exclusive
  ``F.models.<party>`` queue holding only the newest model (max-length 1, drop-head), or,
  for a model over ``--max-chunk-bytes``, the announcement of its version: such a model
  would need several chunks, which that queue cannot hold, so parties fetch it by RPC.
- ``F.dead``     fanout exchange + durable queue holding every rejected message, byte for
  byte, and beside each a reason record (``messages.wire.deadletters``); bounded (oldest first out).
- ``F.partials`` durable queue, edge aggregators -> root (``--role edge|root``), dead-letters
  to ``F.dead``, with the delivery limit.

``F.updates`` and ``F.control`` carry an explicit delivery limit (quorum queues'
``x-delivery-limit``; RabbitMQ 3.x has no default): a message that crashed or stalled its
consumer that many times is dead-lettered by the broker itself, so not even a bug nobody has
found can make one message loop forever.

The aggregator declares the shared part (declaring is idempotent; different arguments are
refused by the broker). A party only checks that it exists (a passive check, which needs no
permission) and declares nothing but its own model queue, so a party's broker user can be
denied every configure right on shared resources (``permissions``).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Literal, get_args

from messages.errors import ConfigError
from messages.transport.broker import Broker, Delivery
from messages.wire.bounds import PARTY_ID
from messages.wire.deadletters import (
    COPY_HEADER,
    RECORD_HEADER,
    Record,
    broker_may_dead_letter,
    encode_record,
    key_of,
    party_of,
)

QueueType = Literal["quorum", "classic"]
QUEUE_TYPES: tuple[str, ...] = get_args(QueueType)
DEFAULT_DELIVERY_LIMIT = 5
"""Deliveries of one message to the aggregator before the broker dead-letters it: enough
for the crashes and restarts of an ordinary bad day (each returns the window's messages once),
few enough that a poison message costs only a few restarts."""
DEAD_MAX_LENGTH = 100_000
DEAD_MAX_BYTES = 1 << 30
"""``F.dead`` keeps at most this many messages and bytes; the oldest go first, so a flood of
bad messages cannot fill the broker's disk."""
_NAME = PARTY_ID


def check_name(what: str, value: str) -> str:
    """Federation and party ids become queue names: keep them short and plain."""
    if not _NAME.match(value):
        raise ConfigError(f"{what} {value!r}: use 1-64 letters, digits, '-' or '_'")
    return value


@dataclass(frozen=True, slots=True)
class Topology:
    """The names of federation ``federation`` and how to declare them."""

    federation: str
    queue_type: str = "quorum"
    updates_max_length: int | None = None
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT

    def __post_init__(self) -> None:
        check_name("federation id", self.federation)
        if self.queue_type not in QUEUE_TYPES:
            raise ConfigError(f"queue type {self.queue_type!r}: use one of {QUEUE_TYPES}")

    @property
    def ingress(self) -> str:
        return f"{self.federation}.in"

    @property
    def updates(self) -> str:
        return f"{self.federation}.updates"

    @property
    def control(self) -> str:
        return f"{self.federation}.control"

    @property
    def models(self) -> str:
        return f"{self.federation}.models"

    @property
    def dead(self) -> str:
        return f"{self.federation}.dead"

    @property
    def helper_requests(self) -> str:
        """Secure aggregation: the leader's mask requests, consumed by the helper."""
        return f"{self.federation}.helper"

    @property
    def helper_sums(self) -> str:
        """Secure aggregation: the helper's answers, consumed by the leader."""
        return f"{self.federation}.sums"

    def declare_helper(self, broker: Broker) -> None:
        """The two queues between leader and helper (idempotent; both daemons declare them):
        durable, so a request or an answer waits for a daemon that is down."""
        broker.declare_exchange(self.dead, "fanout")
        for queue in (self.helper_requests, self.helper_sums):
            broker.declare_queue(queue, arguments=self._consumed_args())

    def helper_permissions(self) -> tuple[str, str, str]:
        """RabbitMQ (configure, write, read) patterns for the helper: its two queues, answers
        through the default exchange, dead letters to ``F.dead``; it reads only requests."""
        f = re.escape(self.federation)
        queues = f"^({f}\\.helper|{f}\\.sums|{f}\\.dead)$"
        return queues, f"^({f}\\.dead|amq\\.default)$", f"^{f}\\.helper$"

    @property
    def partials(self) -> str:
        """Edge aggregators' partial sums, consumed by the root (``aggregator.edge``)."""
        return f"{self.federation}.partials"

    def declare_partials(self, broker: Broker) -> None:
        """The queue from the edges to the root (idempotent; root and edges declare it):
        durable, with the delivery limit, so a partial waits for a root that is down."""
        broker.declare_exchange(self.dead, "fanout")
        broker.declare_queue(self.partials, arguments=self._consumed_args())

    def model_queue(self, party: str) -> str:
        return f"{self.federation}.models.{party}"

    def declare(self, broker: Broker) -> None:
        """Declare the shared exchanges and queues (idempotent)."""
        broker.declare_exchange(self.dead, "fanout")
        broker.declare_queue(self.dead, arguments={
            "x-queue-type": self.queue_type, "x-max-length": DEAD_MAX_LENGTH,
            "x-max-length-bytes": DEAD_MAX_BYTES, "x-overflow": "drop-head"})
        broker.bind(self.dead, self.dead)
        updates_args = self._consumed_args()
        if self.updates_max_length is not None:
            updates_args["x-max-length"] = self.updates_max_length
            updates_args["x-overflow"] = "reject-publish"
        broker.declare_queue(self.updates, arguments=updates_args)
        broker.declare_queue(self.control, arguments=self._consumed_args())
        broker.declare_exchange(self.models, "fanout")
        broker.declare_exchange(self.ingress, "direct")
        broker.bind(self.updates, self.ingress, self.updates)
        broker.bind(self.control, self.ingress, self.control)

    def _consumed_args(self) -> dict[str, Any]:
        """Arguments of the queues the aggregator consumes: dead letters go to ``F.dead``; a
        quorum queue gets the delivery limit (classic queues have none on RabbitMQ 3.x)."""
        args: dict[str, Any] = {"x-queue-type": self.queue_type,
                                "x-dead-letter-exchange": self.dead}
        if self.queue_type == "quorum":
            args["x-delivery-limit"] = self.delivery_limit
        return args

    def ready(self, broker: Broker) -> bool:
        """Whether the aggregator has declared the federation (what a party needs of it)."""
        return broker.exists(self.ingress, exchange=True) and broker.exists(
            self.models, exchange=True)

    def party_permissions(self, party: str) -> tuple[str, str, str]:
        """RabbitMQ (configure, write, read) patterns for party ``party``: declare and bind
        its own model queue; publish to the ingress exchange; read the model fanout and its
        own queue. Nothing else: not ``F.updates``, not another party's queue, not the
        default exchange."""
        f, own = re.escape(self.federation), re.escape(self.model_queue(check_name(
            "party id", party)))
        return f"^{own}$", f"^({f}\\.in|{own})$", f"^({f}\\.models|{own})$"

    def aggregator_permissions(self) -> tuple[str, str, str]:
        """RabbitMQ (configure, write, read) patterns for the aggregator: everything of the
        federation, and the default exchange, through which RPC replies go."""
        f = re.escape(self.federation)
        return f"^{f}\\..*", f"^({f}\\..*|amq\\.default)$", f"^{f}\\..*"

    def declare_model_queue(self, broker: Broker, party: str) -> str:
        """The party's own queue on the model fanout: only ever the newest model."""
        name = self.model_queue(party)
        broker.declare_queue(name, durable=False, exclusive=True, auto_delete=True,
                             arguments={"x-max-length": 1, "x-overflow": "drop-head"})
        broker.bind(name, self.models)
        return name

    def dead_letter(self, broker: Broker, delivery: Delivery, reason: str, detail: str = "",
                    party: str = "") -> None:
        """Dead-letter ``delivery`` to ``F.dead`` with its reason (see ``dead_letter``)."""
        dead_letter(broker, self.dead, delivery, reason, detail, party)


def dead_letter(broker: Broker, exchange: str, delivery: Delivery, reason: str,
                detail: str = "", party: str = "") -> None:
    """Publish the reason record to ``exchange`` (``F.dead``), then reject ``delivery`` (every
    chunk of it) so that the broker dead-letters the original bytes; or, for an envelope the
    broker cannot dead-letter safely, copy the body and ack. See the module docstring.
    """
    parts = delivery.parts or (delivery,)
    copy = not all(broker_may_dead_letter(p.headers) for p in parts)
    # a chunk's token keeps no body: its set's id (in its headers) is its key
    keys = ([key_of(delivery.body, {})] if copy  # the copy carries none of the sender's headers
            else dict.fromkeys(key_of(p.body or delivery.body, p.headers) for p in parts))
    now, sender = time.time(), party or party_of(delivery.headers)
    for key in keys:
        record = encode_record(Record(key, reason, detail, sender, delivery.queue, now))
        broker.publish(exchange, "", record, headers={RECORD_HEADER: 1})
    if copy:
        broker.publish(exchange, "", delivery.body, headers={COPY_HEADER: 1})
        broker.ack(delivery)
    else:
        broker.nack(delivery, requeue=False)
