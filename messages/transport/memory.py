"""``memory://``: an in-process broker with RabbitMQ's semantics, not a mock.

Exchanges (fanout, direct and the default exchange), durable/exclusive/auto-delete queues,
manual acks with per-consumer prefetch, requeue and redelivery of unacked messages when a
connection closes, dead-lettering (``x-dead-letter-exchange``, with an ``x-death`` header as
RabbitMQ writes it), ``x-max-length`` with ``drop-head`` or ``reject-publish`` overflow, and,
with ``memory://name?max_message_bytes=N``, a refusal of bodies over N bytes (RabbitMQ's
``max_message_size``: 16 MiB by default on 4.x), so tests prove that big messages are
chunked (``messages.wire.chunks``) before they reach the broker. It is the embedded broker of a
one-machine run, and the contract tests hold it to the same assertions as RabbitMQ.

Every ``MemoryBroker`` is one connection to a named in-process server (``memory://`` or
``memory://name``); connections made from different threads of one process meet there.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlparse

from messages.errors import (
    AccessRefused,
    BrokerError,
    ConnectionLost,
    PublishRejected,
    ResourceLocked,
)
from messages.transport.broker import Broker, Delivery, Handler, check_headers


@dataclass(slots=True)
class _Message:
    body: bytes
    exchange: str
    routing_key: str
    headers: dict[str, Any]
    reply_to: str | None
    correlation_id: str | None
    redelivered: bool = False
    returns: int = 0  # times delivered and given back (a quorum queue's delivery count)


@dataclass(slots=True)
class _Consumer:
    tag: str
    queue: _Queue
    conn: MemoryBroker
    handler: Handler
    prefetch: int
    auto_ack: bool
    unacked: int = 0


@dataclass(slots=True)
class _Queue:
    name: str
    durable: bool
    exclusive: bool
    auto_delete: bool
    arguments: dict[str, Any]
    owner: MemoryBroker | None
    messages: deque[_Message] = field(default_factory=deque)
    consumers: list[_Consumer] = field(default_factory=list)
    had_consumer: bool = False
    next_consumer: int = 0


@dataclass(slots=True)
class _Exchange:
    name: str
    kind: str
    bindings: list[tuple[str, str]] = field(default_factory=list)


class _Server:
    """The shared state every connection to one ``memory://name`` sees."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.exchanges: dict[str, _Exchange] = {}
        self.queues: dict[str, _Queue] = {}


_SERVERS: dict[str, _Server] = {}
_SERVERS_LOCK = threading.Lock()


def _server(name: str) -> _Server:
    with _SERVERS_LOCK:
        return _SERVERS.setdefault(name, _Server())


class MemoryBroker(Broker):
    """One connection to an in-process server; see the module docstring."""

    def __init__(self, url: str = "memory://") -> None:
        super().__init__()
        self.url = url
        parts = urlparse(url)
        self._server = _server(parts.netloc)
        limit = parse_qs(parts.query).get("max_message_bytes")
        self.max_message_bytes = int(limit[-1]) if limit else None
        self._cond = threading.Condition()
        self._inbox: deque[tuple[Handler, Delivery]] = deque()
        self._callbacks: deque[Callable[[], None]] = deque()
        self._unacked: dict[int, tuple[_Message, _Consumer]] = {}
        self._consumers: dict[str, _Consumer] = {}
        self._tags = itertools.count(1)
        self._reply_queue: str | None = None
        self._closed = False

    # -- topology --------------------------------------------------------------------------
    def declare_exchange(self, name: str, kind: str = "fanout", *, durable: bool = True) -> None:
        self._check_open()
        if kind not in ("fanout", "direct"):
            raise AccessRefused(f"exchange type {kind!r} is not supported by memory://")
        with self._server.lock:
            existing = self._server.exchanges.get(name)
            if existing is None:
                self._server.exchanges[name] = _Exchange(name, kind)
            elif existing.kind != kind:
                raise AccessRefused(f"PRECONDITION_FAILED: exchange {name!r} is {existing.kind}")

    def declare_queue(self, name: str, *, durable: bool = True, exclusive: bool = False,
                      auto_delete: bool = False, arguments: Mapping[str, Any] | None = None
                      ) -> None:
        self._check_open()
        args = dict(arguments or {})
        with self._server.lock:
            q = self._server.queues.get(name)
            if q is None:
                self._server.queues[name] = _Queue(name, durable, exclusive, auto_delete, args,
                                                   self if exclusive else None)
                return
            if q.owner is not None and q.owner is not self:
                raise ResourceLocked(f"RESOURCE_LOCKED: queue {name!r} is exclusive to another "
                                     "connection")
            if (q.durable, q.exclusive, q.auto_delete, q.arguments) != (
                    durable, exclusive, auto_delete, args):
                raise AccessRefused(f"PRECONDITION_FAILED: queue {name!r} exists with other "
                                    "arguments")

    def bind(self, queue: str, exchange: str, routing_key: str = "") -> None:
        self._check_open()
        with self._server.lock:
            self._queue(queue)
            ex = self._exchange(exchange)
            if (queue, routing_key) not in ex.bindings:
                ex.bindings.append((queue, routing_key))

    def delete_queue(self, name: str) -> None:
        self._check_open()
        with self._server.lock:
            self._drop_queue(name)

    def exists(self, name: str, *, exchange: bool = False) -> bool:
        self._check_open()
        with self._server.lock:
            return name in (self._server.exchanges if exchange else self._server.queues)

    def queue_depth(self, name: str) -> int:
        self._check_open()
        with self._server.lock:
            return len(self._queue(name).messages)

    # -- publishing ------------------------------------------------------------------------
    def publish(self, exchange: str, routing_key: str, body: bytes, *,
                headers: Mapping[str, Any] | None = None, persistent: bool = True,
                mandatory: bool = False, reply_to: str | None = None,
                correlation_id: str | None = None) -> None:
        self._check_open()
        if self.max_message_bytes is not None and len(body) > self.max_message_bytes:
            # what RabbitMQ does: the channel is closed with 406 PRECONDITION_FAILED
            raise AccessRefused(f"PRECONDITION_FAILED: message size {len(body)} is larger than "
                                f"configured max size {self.max_message_bytes}")
        msg = _Message(bytes(body), exchange, routing_key, check_headers(headers), reply_to,
                       correlation_id)
        with self._server.lock:
            queues = self._route(exchange, routing_key)
            if mandatory and not queues:
                raise PublishRejected(f"unroutable: no queue bound for {exchange!r}/"
                                      f"{routing_key!r}")
            rejected = [q.name for q in queues if not self._enqueue(q, msg)]
        if rejected:
            raise PublishRejected(f"queue {rejected[0]!r} is full (reject-publish)")

    def _route(self, exchange: str, routing_key: str) -> list[_Queue]:
        if exchange == "":
            q = self._server.queues.get(routing_key)
            return [q] if q is not None else []
        ex = self._exchange(exchange)
        names = [qn for qn, key in ex.bindings if ex.kind == "fanout" or key == routing_key]
        return [self._server.queues[n] for n in dict.fromkeys(names) if n in self._server.queues]

    def _enqueue(self, q: _Queue, msg: _Message) -> bool:
        """Store ``msg`` in ``q`` honouring max-length; False when the queue refuses it."""
        limit = q.arguments.get("x-max-length")
        overflow = q.arguments.get("x-overflow", "drop-head")
        if limit is not None and len(q.messages) >= limit and overflow == "reject-publish":
            return False
        q.messages.append(_Message(msg.body, msg.exchange, msg.routing_key, dict(msg.headers),
                                   msg.reply_to, msg.correlation_id))
        while limit is not None and len(q.messages) > limit:
            self._dead_letter(q, q.messages.popleft(), "maxlen")
        self._dispatch(q)
        return True

    def _dead_letter(self, q: _Queue, msg: _Message, reason: str) -> None:
        dlx = q.arguments.get("x-dead-letter-exchange")
        if dlx is None or dlx not in self._server.exchanges:
            return
        key = q.arguments.get("x-dead-letter-routing-key", msg.routing_key)
        headers = dict(msg.headers)
        deaths = list(headers.get("x-death", []))
        deaths.insert(0, {"reason": reason, "queue": q.name, "count": 1,
                          "exchange": msg.exchange, "routing-keys": [msg.routing_key]})
        headers["x-death"] = deaths
        headers.setdefault("x-first-death-reason", reason)
        headers.setdefault("x-first-death-queue", q.name)
        dead = _Message(msg.body, dlx, key, headers, msg.reply_to, msg.correlation_id)
        for target in self._route(dlx, key):
            self._enqueue(target, dead)

    def _return(self, q: _Queue, msg: _Message) -> None:
        """A delivery given back (requeued, or its consumer's connection closed): to the head
        of its queue, unless that makes it pass the queue's ``x-delivery-limit``, where it is
        dead-lettered as RabbitMQ's quorum queues do (``delivery_limit``)."""
        msg.redelivered = True
        msg.returns += 1
        msg.headers["x-delivery-count"] = msg.returns
        limit = q.arguments.get("x-delivery-limit")
        if isinstance(limit, int) and msg.returns > limit:
            self._dead_letter(q, msg, "delivery_limit")
        else:
            q.messages.appendleft(msg)

    def _dispatch(self, q: _Queue) -> None:
        """Hand ready messages to consumers with spare prefetch, round robin."""
        while q.messages and q.consumers:
            n = len(q.consumers)
            for i in range(n):
                c = q.consumers[(q.next_consumer + i) % n]
                if c.auto_ack or c.prefetch == 0 or c.unacked < c.prefetch:
                    q.next_consumer = (q.next_consumer + i + 1) % n
                    break
            else:
                return
            msg = q.messages.popleft()
            c.conn._deliver(c, msg)

    def _deliver(self, c: _Consumer, msg: _Message) -> None:
        tag = next(self._tags)
        if not c.auto_ack:
            c.unacked += 1
            self._unacked[tag] = (msg, c)
        delivery = Delivery(msg.body, tag, c.queue.name, dict(msg.headers), msg.redelivered,
                            msg.reply_to, msg.correlation_id)
        with self._cond:
            self._inbox.append((c.handler, delivery))
            self._cond.notify_all()

    # -- consuming -------------------------------------------------------------------------
    def consume(self, queue: str, handler: Handler, *, prefetch: int = 0,
                auto_ack: bool = False) -> str:
        self._check_open()
        with self._server.lock:
            q = self._queue(queue)
            if q.owner is not None and q.owner is not self:
                raise ResourceLocked(f"RESOURCE_LOCKED: queue {queue!r} is exclusive")
            c = _Consumer(f"ctag-{uuid.uuid4().hex[:12]}", q, self, handler, prefetch, auto_ack)
            q.consumers.append(c)
            q.had_consumer = True
            self._consumers[c.tag] = c
            self._dispatch(q)
        return c.tag

    def cancel(self, consumer_tag: str) -> None:
        self._check_open()
        with self._server.lock:
            self._remove_consumer(consumer_tag)

    def _remove_consumer(self, consumer_tag: str) -> None:
        c = self._consumers.pop(consumer_tag, None)
        if c is None:
            return
        q = c.queue
        if c in q.consumers:
            q.consumers.remove(c)
        if q.auto_delete and q.had_consumer and not q.consumers:
            self._drop_queue(q.name)

    def ack(self, delivery: Delivery, *, multiple: bool = False) -> None:
        self._check_open()
        with self._server.lock:
            for _msg, c in self._settle(delivery.tag, multiple):
                c.unacked -= 1
                self._dispatch(c.queue)

    def nack(self, delivery: Delivery, *, requeue: bool = False) -> None:
        self._check_open()
        with self._server.lock:
            for msg, c in self._settle(delivery.tag, False):
                c.unacked -= 1
                if requeue:
                    self._return(c.queue, msg)
                else:
                    self._dead_letter(c.queue, msg, "rejected")
                self._dispatch(c.queue)

    def _settle(self, tag: int, multiple: bool) -> list[tuple[_Message, _Consumer]]:
        if tag not in self._unacked:
            raise BrokerError(f"PRECONDITION_FAILED: unknown delivery tag {tag}")
        tags = [t for t in self._unacked if t <= tag] if multiple else [tag]
        return [self._unacked.pop(t) for t in tags]

    def get(self, queue: str) -> Delivery | None:
        self._check_open()
        with self._server.lock:
            q = self._queue(queue)
            if not q.messages:
                return None
            msg = q.messages.popleft()
            return Delivery(msg.body, next(self._tags), queue, dict(msg.headers),
                            msg.redelivered, msg.reply_to, msg.correlation_id)

    # -- request/reply ---------------------------------------------------------------------
    def reply_address(self) -> str:
        if self._reply_queue is None:
            name = f"amq.gen-{uuid.uuid4().hex}"
            self.declare_queue(name, durable=False, exclusive=True, auto_delete=True)
            self.consume(name, self._on_reply, auto_ack=True)
            self._reply_queue = name
        return self._reply_queue

    # -- event loop ------------------------------------------------------------------------
    def process_events(self, timeout: float) -> None:
        self._check_open()
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._cond:
            while not (self._inbox or self._callbacks or self._closed):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(remaining)
            callbacks, self._callbacks = self._callbacks, deque()
            inbox, self._inbox = self._inbox, deque()
        for fn in callbacks:
            fn()
        for handler, delivery in inbox:
            if not self._closed:
                handler(delivery)

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        with self._cond:
            self._callbacks.append(fn)
            self._cond.notify_all()

    def close(self) -> None:
        if self._closed:
            return
        with self._server.lock:
            self._closed = True
            for tag in list(self._consumers):
                self._remove_consumer(tag)
            # Unacked messages go back to the head of their queues, in their original order.
            for _tag, (msg, c) in sorted(self._unacked.items(), reverse=True):
                self._return(c.queue, msg)
            touched = {c.queue.name for _m, c in self._unacked.values()}
            self._unacked.clear()
            for name in [n for n, q in self._server.queues.items() if q.owner is self]:
                self._drop_queue(name)
            for name in touched:
                if name in self._server.queues:
                    self._dispatch(self._server.queues[name])
        with self._cond:
            self._inbox.clear()
            self._cond.notify_all()

    # -- helpers ---------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionLost("memory:// connection is closed")

    def _queue(self, name: str) -> _Queue:
        q = self._server.queues.get(name)
        if q is None:
            raise AccessRefused(f"NOT_FOUND: no queue {name!r}")
        return q

    def _exchange(self, name: str) -> _Exchange:
        ex = self._server.exchanges.get(name)
        if ex is None:
            raise AccessRefused(f"NOT_FOUND: no exchange {name!r}")
        return ex

    def _drop_queue(self, name: str) -> None:
        q = self._server.queues.pop(name, None)
        if q is None:
            return
        for ex in self._server.exchanges.values():
            ex.bindings = [(qn, k) for qn, k in ex.bindings if qn != name]
        for c in list(q.consumers):
            c.conn._consumers.pop(c.tag, None)
