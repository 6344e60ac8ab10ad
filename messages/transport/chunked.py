"""A broker connection that chunks big bodies on the way out and reassembles them on the way in.

``ChunkedBroker`` wraps any ``Broker`` (``chunked(connect(url), settings)``) and keeps its
interface, so the daemons publish, consume, ack and call as before:

- ``publish`` sends a body over ``max_chunk_bytes`` as chunks (``messages.wire.chunks``), each
  with its own confirm; anything smaller goes through untouched. When a chunk is refused
  (a full ``reject-publish`` queue), publishing the same bytes object to the same place again
  on this connection resumes at that chunk, under the same set id, instead of sending the
  first chunks twice. After a reconnect (a new connection) the whole set goes again under a
  new id; the receiver discards the partial first one when the second completes.
- A consumer's handler sees whole messages only. Chunks wait in a ``Reassembler``,
  **unacked**: a receiver that crashes leaves them to the broker, which redelivers them, and
  they reassemble again. When a set completes, the handler gets one ``Delivery`` whose
  ``parts`` are the chunk deliveries; acking or nacking it settles them all.
- ``ack(d, multiple=True)`` means what it means without chunks: ``d`` and everything handed to
  the handler before it. It never acks a chunk still waiting for its set, even one that
  arrived before ``d`` (a plain ``basic.ack multiple`` would); the acks below the oldest
  waiting chunk stay one cumulative ack.
- A set that fails (inconsistent headers, wrong lengths, wrong SHA-256, too large) or stays
  incomplete (no chunk for ``chunk_timeout`` seconds, or superseded by a newer complete set
  of the same sender) goes to ``reject`` as one ``Delivery`` with its chunks as ``parts`` and
  what arrived of the body, in chunk order, as its body (the aggregator dead-letters it with
  the reason, in chunks again when it is big, and acks it), or, without ``reject``, is nacked
  to the queue's dead-letter exchange. It is never handed to the handler.

Prefetch: ``consume(..., prefetch=N)`` keeps meaning N whole messages. A chunk with ``count``
chunks per message raises the consumer's window to ``N * count`` deliveries, so the unacked
chunks of N messages fit, including several parties' chunks interleaved in the queue; when the
window is nonetheless full of chunks whose sets cannot complete (more parties publish at once
than N), it doubles. Either way it never passes ``N + max_pending_chunks``: the chunks held
for incomplete sets are bounded (``max_pending_chunks`` chunks and ``max_pending_bytes``
bytes in all, one message's worth per sender; the oldest sets are given up first, as
``chunk-overflow``), and N more deliveries keep the consumer moving. So what a consumer holds
is at most ``max_pending_bytes`` of held chunks plus N deliveries in flight, whatever parties
send, and a federation whose messages fit in one chunk never sees a window other than N.
A chunk over ``max_chunk_bytes`` is given up at once (``too-large``).

RabbitMQ applies a prefetch to consumers started after it only, so the window grows by
starting one more consumer on the queue (same channel, same handler) with the extra room:
cancelling the first would make the broker take back what it had already sent and send it
again.

``get`` hands chunks over as they are (tests and audits drain queues with it).
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from messages.errors import BrokerError, InvalidMessage
from messages.transport.broker import Broker, Delivery, Handler
from messages.wire.chunks import (
    CHUNK_COUNT,
    CHUNK_ID,
    DEFAULT_CHUNK_TIMEOUT,
    DEFAULT_MAX_CHUNK_BYTES,
    DEFAULT_MAX_PENDING_BYTES,
    DEFAULT_MAX_PENDING_CHUNKS,
    Plan,
    Reassembler,
    split,
)
from messages.wire.codec import DEFAULT_MAX_BYTES

log = logging.getLogger("dfl.chunks")
MAX_PREFETCH = 65535
"""AMQP's prefetch-count is a 16-bit field."""
Reject = Callable[[Delivery, InvalidMessage], None]


class ChunkSettings(Protocol):
    """What ``chunked`` reads of a daemon's settings (``FederationSettings`` has them)."""

    max_chunk_bytes: int
    max_message_bytes: int
    chunk_timeout: float
    max_pending_chunk_bytes: int
    max_pending_chunks: int


@dataclass(eq=False, slots=True)
class _Subscription:
    """One ``consume`` of the caller: one or more inner consumers of the same queue."""

    queue: str
    handler: Handler
    prefetch: int  # whole messages, as the caller asked
    auto_ack: bool
    assembler: Reassembler[Delivery]
    window: int = 0  # deliveries: the sum of the inner consumers' prefetch
    tags: list[str] = field(default_factory=list)  # the inner consumers
    outstanding: int = 0  # deliveries not settled yet
    held: int = 0  # of those, chunks waiting for the rest of their set


@dataclass(eq=False, slots=True)
class _Resume:
    body: bytes
    where: tuple[str, str]
    headers: dict[str, Any]
    plan: Plan
    next: int


class ChunkedBroker(Broker):
    """``inner`` with chunking; see the module docstring."""

    def __init__(self, inner: Broker, *, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
                 max_message_bytes: int = DEFAULT_MAX_BYTES,
                 timeout: float = DEFAULT_CHUNK_TIMEOUT, sender: str | None = None,
                 reject: Reject | None = None,
                 max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
                 max_pending_chunks: int = DEFAULT_MAX_PENDING_CHUNKS) -> None:
        """``sender`` goes on every chunk this connection publishes (a party id); ``reject``
        takes each set given up on (see the module docstring)."""
        super().__init__()
        self.inner = inner
        self.url = inner.url
        self.max_chunk_bytes = max_chunk_bytes
        self.max_message_bytes = max_message_bytes
        self.timeout = timeout
        self.max_pending_bytes = max_pending_bytes
        self.max_pending_chunks = max_pending_chunks
        self.sender = sender
        self._reject = reject
        self._subs: dict[str, _Subscription] = {}
        self._ids = itertools.count(1)
        self._unsettled: dict[int, _Subscription] = {}  # manual-ack deliveries, in tag order
        self.deliveries = 0
        """Deliveries received from the inner broker so far (chunks count one each)."""
        self._held: dict[int, _Subscription] = {}  # of those, chunks of incomplete sets
        self._resume: _Resume | None = None

    @property
    def held(self) -> int:
        """Chunk deliveries waiting, unacked, for the rest of their sets."""
        return len(self._held)

    # -- topology: as the inner broker -----------------------------------------------------
    def declare_exchange(self, name: str, kind: str = "fanout", *, durable: bool = True) -> None:
        self.inner.declare_exchange(name, kind, durable=durable)

    def declare_queue(self, name: str, *, durable: bool = True, exclusive: bool = False,
                      auto_delete: bool = False, arguments: Mapping[str, Any] | None = None
                      ) -> None:
        self.inner.declare_queue(name, durable=durable, exclusive=exclusive,
                                 auto_delete=auto_delete, arguments=arguments)

    def bind(self, queue: str, exchange: str, routing_key: str = "") -> None:
        self.inner.bind(queue, exchange, routing_key)

    def delete_queue(self, name: str) -> None:
        self.inner.delete_queue(name)

    def queue_depth(self, name: str) -> int:
        return self.inner.queue_depth(name)

    def exists(self, name: str, *, exchange: bool = False) -> bool:
        return self.inner.exists(name, exchange=exchange)

    # -- publishing ------------------------------------------------------------------------
    def publish(self, exchange: str, routing_key: str, body: bytes, *,
                headers: Mapping[str, Any] | None = None, persistent: bool = True,
                mandatory: bool = False, reply_to: str | None = None,
                correlation_id: str | None = None) -> None:
        if len(body) <= self.max_chunk_bytes:
            self.inner.publish(exchange, routing_key, body, headers=headers,
                               persistent=persistent, mandatory=mandatory, reply_to=reply_to,
                               correlation_id=correlation_id)
            return
        where, fixed = (exchange, routing_key), dict(headers or {})
        r = self._resume
        if r is not None and r.body is body and r.where == where and r.headers == fixed:
            plan, start = r.plan, r.next
            log.info("resuming a chunked publish to %s at chunk %d of %d",
                     exchange or routing_key, start, len(plan))
        else:
            plan, start = split(body, self.max_chunk_bytes, fixed, sender=self.sender), 0
        self._resume = None
        for i in range(start, len(plan)):
            chunk, chunk_headers = plan.chunk(i)
            try:
                self.inner.publish(exchange, routing_key, chunk, headers=chunk_headers,
                                   persistent=persistent, mandatory=mandatory,
                                   reply_to=reply_to, correlation_id=correlation_id)
            except BrokerError:
                self._resume = _Resume(body, where, fixed, plan, i)
                raise

    # -- consuming -------------------------------------------------------------------------
    def consume(self, queue: str, handler: Handler, *, prefetch: int = 0,
                auto_ack: bool = False) -> str:
        sub = _Subscription(queue, handler, prefetch, auto_ack, Reassembler(
            self.max_message_bytes, self.timeout, max_chunk_bytes=self.max_chunk_bytes,
            max_pending_bytes=self.max_pending_bytes,
            max_pending_chunks=self.max_pending_chunks))
        self._widen(sub, prefetch)
        tag = f"chunked-{next(self._ids)}"
        self._subs[tag] = sub
        return tag

    def _widen(self, sub: _Subscription, window: int) -> None:
        """Start one more inner consumer, so that ``sub`` may hold ``window`` deliveries."""
        extra = window - sub.window if sub.tags else window
        sub.tags.append(self.inner.consume(sub.queue, lambda d: self._on_delivery(sub, d),
                                           prefetch=extra, auto_ack=sub.auto_ack))
        sub.window = window
        if len(sub.tags) > 1:
            log.info("%s: consuming with a window of %d deliveries (%d whole messages)",
                     sub.queue, window, sub.prefetch)

    def set_prefetch(self, consumer_tag: str, prefetch: int) -> None:
        """Let consumer ``consumer_tag`` hold ``prefetch`` whole messages from now on (only
        ever wider: the broker keeps what it already sent)."""
        sub = self._subs[consumer_tag]
        if prefetch > sub.prefetch:
            sub.prefetch = prefetch
            if not sub.auto_ack and prefetch > sub.window:
                self._widen(sub, prefetch)

    def cancel(self, consumer_tag: str) -> None:
        sub = self._subs.pop(consumer_tag, None)
        for tag in sub.tags if sub is not None else ():
            self.inner.cancel(tag)

    def _on_delivery(self, sub: _Subscription, d: Delivery) -> None:
        self.deliveries += 1
        if not sub.auto_ack:
            self._unsettled[d.tag] = sub
            sub.outstanding += 1
        if CHUNK_ID not in d.headers:  # the hot path: an ordinary message
            sub.handler(d)
            return
        if not sub.auto_ack:
            self._held[d.tag] = sub
            sub.held += 1
        self._size_window(sub, d.headers.get(CHUNK_COUNT))
        # the token keeps no body: the reassembler holds the one copy
        try:
            whole = sub.assembler.add(d.headers, d.body, replace(d, body=b""))
        except Exception as exc:  # a bug of ours in reassembly: this chunk alone is given up
            log.exception("internal error reassembling a chunk from %s", sub.queue)
            self._release(d.tag)
            self._give_up(sub, d, InvalidMessage("internal-error",
                                                 f"{type(exc).__name__}: {exc}"[:300]))
            return
        self._settle_discarded(sub)
        if whole is None:
            return
        for part in whole.tokens:
            self._release(part.tag)
        sub.handler(Delivery(whole.body, d.tag, d.queue, whole.headers,
                             any(p.redelivered for p in whole.tokens), d.reply_to,
                             d.correlation_id, tuple(whole.tokens)))

    def _size_window(self, sub: _Subscription, count: object) -> None:
        """Room for ``prefetch`` whole messages of ``count`` chunks (see the docstring)."""
        if sub.auto_ack or sub.prefetch == 0 or not isinstance(count, int):
            return
        want = min(self._cap(sub), sub.prefetch * count)
        if want > sub.window:
            self._widen(sub, want)

    def _cap(self, sub: _Subscription) -> int:
        """The widest window of ``sub``: the held chunks' bound plus N (see the module
        docstring)."""
        return min(MAX_PREFETCH, sub.prefetch + self.max_pending_chunks)

    def _settle_discarded(self, sub: _Subscription) -> None:
        for bad in sub.assembler.discarded():
            for part in bad.tokens:
                self._release(part.tag)
            if sub.auto_ack:
                log.warning("dropped chunks from %s: %s", sub.queue, bad.error)
                continue
            self._give_up(sub, Delivery(bad.body, max(p.tag for p in bad.tokens), sub.queue,
                                        bad.headers, parts=tuple(bad.tokens)), bad.error)

    def _give_up(self, sub: _Subscription, whole: Delivery, error: InvalidMessage) -> None:
        if self._reject is not None:
            self._reject(whole, error)
        else:
            log.warning("dead-lettering %d chunks from %s: %s", len(whole.parts or (whole,)),
                        sub.queue, error)
            self.nack(whole)

    def _release(self, tag: int) -> None:
        sub = self._held.pop(tag, None)
        if sub is not None:
            sub.held -= 1

    def _forget(self, tag: int) -> None:
        self._release(tag)
        sub = self._unsettled.pop(tag, None)
        if sub is not None:
            sub.outstanding -= 1

    def ack(self, delivery: Delivery, *, multiple: bool = False) -> None:
        if not multiple:
            for part in delivery.parts or (delivery,):
                self.inner.ack(part)
                self._forget(part.tag)
            return
        top = delivery.tag
        floor = min((t for t in self._held if t < top), default=None)
        if floor is None:  # nothing waiting below: one cumulative ack, as without chunks
            self.inner.ack(delivery, multiple=True)
            for tag in list(itertools.takewhile(lambda t: t <= top, self._unsettled)):
                self._forget(tag)
            return
        below = [t for t in itertools.takewhile(lambda t: t < floor, self._unsettled)]
        if below:
            self.inner.ack(Delivery(b"", below[-1], delivery.queue), multiple=True)
        between = [t for t in itertools.takewhile(lambda t: t <= top, self._unsettled)
                   if t > floor and t not in self._held]
        for tag in between:
            self.inner.ack(Delivery(b"", tag, delivery.queue))
        for tag in below + between:
            self._forget(tag)

    def nack(self, delivery: Delivery, *, requeue: bool = False) -> None:
        for part in delivery.parts or (delivery,):
            self.inner.nack(part, requeue=requeue)
            self._forget(part.tag)

    def get(self, queue: str) -> Delivery | None:
        return self.inner.get(queue)

    # -- request/reply ---------------------------------------------------------------------
    def call(self, queue: str, body: bytes, *, timeout: float,
             headers: Mapping[str, Any] | None = None, exchange: str = "") -> Delivery:
        """As ``Broker.call``; the request and the reply may both be chunked.

        Raises ``InvalidMessage`` when the reply's chunks do not reassemble.
        """
        inner, cid = self.inner, uuid.uuid4().hex
        address = inner.reply_address()
        inner.expect_reply(cid)
        deadline = time.monotonic() + timeout
        try:
            self.publish(exchange, queue, body, headers=headers, persistent=False,
                         mandatory=True, reply_to=address, correlation_id=cid)
            assembler: Reassembler[None] = Reassembler(self.max_message_bytes, timeout)
            while True:
                d = inner.next_reply(cid, deadline,
                                     f"no reply from {queue!r} within {timeout:g} s")
                if CHUNK_ID not in d.headers:
                    return d
                whole = assembler.add(d.headers, d.body, None)
                for bad in assembler.discarded():
                    raise bad.error
                if whole is not None:
                    return Delivery(whole.body, d.tag, d.queue, whole.headers, d.redelivered,
                                    d.reply_to, d.correlation_id)
        finally:
            inner.forget_reply(cid)

    def reply_address(self) -> str:
        return self.inner.reply_address()

    def expect_reply(self, correlation_id: str) -> None:
        self.inner.expect_reply(correlation_id)

    def forget_reply(self, correlation_id: str) -> None:
        self.inner.forget_reply(correlation_id)

    def next_reply(self, correlation_id: str, deadline: float, timeout_text: str) -> Delivery:
        return self.inner.next_reply(correlation_id, deadline, timeout_text)

    # -- the event loop --------------------------------------------------------------------
    def process_events(self, timeout: float) -> None:
        self.inner.process_events(timeout)
        self._maintain()

    def _maintain(self) -> None:
        """Discard stalled sets; grow a window that is full of chunks that cannot complete."""
        for sub in list(self._subs.values()):
            self._settle_discarded(sub)
            if sub.auto_ack or sub.prefetch == 0 or sub.window >= self._cap(sub):
                continue
            if sub.outstanding >= sub.window and sub.held >= sub.outstanding:
                log.warning("%s: the prefetch window is full of chunks of %d incomplete "
                            "messages (more parties publish at once than --prefetch %d); "
                            "doubling it", sub.queue, sub.assembler.pending, sub.prefetch)
                self._widen(sub, min(self._cap(sub), sub.window * 2))

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        self.inner.call_soon_threadsafe(fn)

    def close(self) -> None:
        for sub in self._subs.values():
            sub.assembler.clear()  # their deliveries go back to the queue with the connection
        self._held.clear()
        self._unsettled.clear()
        self.inner.close()


def chunked(broker: Broker, settings: ChunkSettings, *, sender: str | None = None,
            reject: Reject | None = None) -> ChunkedBroker:
    """``broker`` with the federation's chunking settings (see ``ChunkedBroker``)."""
    return ChunkedBroker(broker, max_chunk_bytes=settings.max_chunk_bytes,
                         max_message_bytes=settings.max_message_bytes,
                         timeout=settings.chunk_timeout, sender=sender, reject=reject,
                         max_pending_bytes=settings.max_pending_chunk_bytes,
                         max_pending_chunks=settings.max_pending_chunks)
