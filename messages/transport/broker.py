"""The ``Broker`` interface and how a URL picks an implementation.

Two implementations share these semantics: ``amqp://``/``amqps://`` (RabbitMQ through pika,
``messages.transport.rabbitmq``) and ``memory://`` (an in-process broker,
``messages.transport.memory``). Both give real queues, fanout, manual acks, redelivery of
unacked messages, dead-lettering and max-length overflow, so the contract tests run the same
assertions against both; ``messages.transport.connect`` picks one by URL.

A broker object is one connection with one channel and, like pika's BlockingConnection, it
is not thread-safe: one thread calls its methods and runs ``process_events``, which is where
consumer handlers run. Other threads hand work to that thread with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import abc
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlparse

from messages.errors import ConfigError, RpcTimeout
from messages.transport.tls import TLS_PARAMS, parse_options, split_url
from messages.types import Headers

Handler = Callable[["Delivery"], None]


@dataclass(slots=True)
class Delivery:
    """A message handed to a consumer; ack or nack it through the broker that delivered it."""

    body: bytes
    tag: int
    queue: str
    headers: Headers = field(default_factory=dict)
    redelivered: bool = False
    reply_to: str | None = None
    correlation_id: str | None = None
    parts: tuple[Delivery, ...] = ()
    """For a message reassembled from chunks (``messages.transport.chunked``): the chunk
    deliveries it stands for. Acking or nacking it settles them."""


def check_headers(headers: Mapping[str, Any] | None) -> Headers:
    """AMQP tables (as pika encodes them) cannot carry floats; refuse them on both brokers."""
    out: Headers = dict(headers or {})
    for key, value in out.items():
        if isinstance(value, float):
            raise ValueError(f"header {key!r} is a float; send it as a string or an int")
    return out


class Broker(abc.ABC):
    """One connection + channel to a message broker. See the module docstring."""

    url: str

    def __init__(self) -> None:
        # RPC replies by correlation id, for the calls still waiting (a reply may come in
        # several parts: see messages.transport.chunked); replies to no waiting call are dropped.
        self._replies: dict[str, deque[Delivery]] = {}

    # -- topology --------------------------------------------------------------------------
    @abc.abstractmethod
    def declare_exchange(self, name: str, kind: str = "fanout", *, durable: bool = True) -> None:
        """Declare an exchange (``fanout`` or ``direct``); idempotent."""

    @abc.abstractmethod
    def declare_queue(self, name: str, *, durable: bool = True, exclusive: bool = False,
                      auto_delete: bool = False, arguments: Mapping[str, Any] | None = None
                      ) -> None:
        """Declare a queue; idempotent, but different arguments for an existing queue raise
        ``AccessRefused`` (RabbitMQ's PRECONDITION_FAILED)."""

    @abc.abstractmethod
    def bind(self, queue: str, exchange: str, routing_key: str = "") -> None:
        """Route ``exchange``'s messages (with ``routing_key`` for direct ones) to ``queue``."""

    @abc.abstractmethod
    def delete_queue(self, name: str) -> None:
        """Delete a queue and the messages in it (missing queues are fine)."""

    @abc.abstractmethod
    def queue_depth(self, name: str) -> int:
        """Messages ready in ``name`` (not counting unacked ones)."""

    @abc.abstractmethod
    def exists(self, name: str, *, exchange: bool = False) -> bool:
        """Whether the queue (or ``exchange``) ``name`` exists. A passive check: it needs no
        permission to configure, so a restricted party can see if its federation is up."""

    # -- publishing ------------------------------------------------------------------------
    @abc.abstractmethod
    def publish(self, exchange: str, routing_key: str, body: bytes, *,
                headers: Mapping[str, Any] | None = None, persistent: bool = True,
                mandatory: bool = False, reply_to: str | None = None,
                correlation_id: str | None = None) -> None:
        """Publish and wait for the broker's confirm.

        Raises ``PublishRejected`` when the broker nacks (e.g. a full ``reject-publish``
        queue) or, with ``mandatory``, when no queue took the message. Returning means the
        broker has the message (on disk, for persistent messages on durable queues).
        """

    # -- consuming -------------------------------------------------------------------------
    @abc.abstractmethod
    def consume(self, queue: str, handler: Handler, *, prefetch: int = 0,
                auto_ack: bool = False) -> str:
        """Start delivering ``queue``'s messages to ``handler`` (during ``process_events``).

        ``prefetch`` bounds unacked deliveries to this consumer (0: unbounded). Returns a
        consumer tag for ``cancel``.
        """

    @abc.abstractmethod
    def cancel(self, consumer_tag: str) -> None:
        """Stop a consumer; its unacked deliveries stay unacked until acked or the close."""

    @abc.abstractmethod
    def ack(self, delivery: Delivery, *, multiple: bool = False) -> None:
        """Acknowledge ``delivery`` (and, with ``multiple``, every earlier one)."""

    @abc.abstractmethod
    def nack(self, delivery: Delivery, *, requeue: bool = False) -> None:
        """Reject ``delivery``: back to its queue, or to the queue's dead-letter exchange."""

    @abc.abstractmethod
    def get(self, queue: str) -> Delivery | None:
        """Take one message without a consumer (auto-acked); ``None`` when empty."""

    # -- request/reply ---------------------------------------------------------------------
    def call(self, queue: str, body: bytes, *, timeout: float,
             headers: Mapping[str, Any] | None = None, exchange: str = "") -> Delivery:
        """Send ``body`` to ``queue`` and wait for the reply (``RpcTimeout`` after ``timeout``).

        ``queue`` is the routing key on ``exchange`` (the default exchange routes it to the
        queue of that name; a party routes through its federation's ingress exchange).

        The server answers with ``reply(request, body)``.
        """
        cid = uuid.uuid4().hex
        address = self.reply_address()
        self.expect_reply(cid)
        try:
            self.publish(exchange, queue, body, headers=headers, persistent=False,
                         mandatory=True, reply_to=address, correlation_id=cid)
            return self.next_reply(cid, time.monotonic() + timeout,
                                   f"no reply from {queue!r} within {timeout:g} s")
        finally:
            self.forget_reply(cid)

    @abc.abstractmethod
    def reply_address(self) -> str:
        """The ``reply_to`` of this connection's requests (its reply consumer starts on first
        use)."""

    def expect_reply(self, correlation_id: str) -> None:
        """Keep the replies to ``correlation_id`` for ``next_reply`` (until ``forget_reply``)."""
        self._replies[correlation_id] = deque()

    def forget_reply(self, correlation_id: str) -> None:
        """Stop keeping replies to ``correlation_id``; later ones are dropped."""
        self._replies.pop(correlation_id, None)

    def next_reply(self, correlation_id: str, deadline: float, timeout_text: str) -> Delivery:
        """The next reply to ``correlation_id`` (see ``expect_reply``), servicing the
        connection until it comes; ``RpcTimeout(timeout_text)`` at ``deadline``
        (``time.monotonic()``)."""
        box = self._replies[correlation_id]
        while not box:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RpcTimeout(timeout_text)
            self.process_events(min(remaining, 1.0))
        return box.popleft()

    def _on_reply(self, delivery: Delivery) -> None:
        """The reply consumer's handler: file a reply under the call waiting for it."""
        box = self._replies.get(delivery.correlation_id or "")
        if box is not None:
            box.append(delivery)

    def reply(self, request: Delivery, body: bytes, *,
              headers: Mapping[str, Any] | None = None) -> None:
        """Answer an RPC request that arrived with ``reply_to``."""
        if request.reply_to:
            self.publish("", request.reply_to, body, headers=headers, persistent=False,
                         correlation_id=request.correlation_id)

    # -- the event loop --------------------------------------------------------------------
    @abc.abstractmethod
    def process_events(self, timeout: float) -> None:
        """Run handlers and thread-safe callbacks; block up to ``timeout`` s for the first."""

    @abc.abstractmethod
    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the thread that runs ``process_events`` (safe from any thread)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection; unacked deliveries go back to their queues (redelivered)."""

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


SCHEMES = ("memory", "amqp", "amqps")
# pika's own URL parameters that keep their meaning here (connection_attempts and retry_delay
# do not: the supervisors own reconnecting), then the TLS ones of RabbitMQ's URI spec.
AMQP_PARAMS = ("heartbeat", "channel_max", "frame_max", "locale", "socket_timeout",
               "stack_timeout", "blocked_connection_timeout")


_NEXT_URL = re.compile(r"\s*,\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def broker_urls(url: str) -> list[str]:
    """The node URLs in ``--broker``: one URL, or the nodes of one RabbitMQ cluster separated
    by commas (``amqp://u:p@rabbit-0:5672/%2F,amqp://u:p@rabbit-1:5672/%2F``), tried in turn.

    A comma only separates where the next URL's scheme follows it, so a comma inside a
    password or a query stays part of its URL.
    """
    return [part for part in _NEXT_URL.split(url.strip()) if part]


def mask_url(url: str) -> str:
    """``url`` (each node's, for several) with its password replaced by ``***`` (for errors,
    logs and status output)."""
    masked = []
    for one in broker_urls(url) or [url]:
        parts = urlparse(one)
        masked.append(one.replace(f":{parts.password}@", ":***@", 1) if parts.password
                      else one)
    return ",".join(masked)


def check_broker_url(url: str) -> str:
    """Refuse a broker URL no implementation serves, at configuration time.

    For ``amqp://`` and ``amqps://`` the query parameters must be known ones, and the TLS
    files an ``amqps://`` URL names must exist (``ConfigError``, one line, no password).
    Several URLs (``broker_urls``) must all be ``amqp://``/``amqps://`` ones.
    """
    nodes = broker_urls(url)
    if len(nodes) > 1:
        if any(urlparse(node).scheme not in ("amqp", "amqps") for node in nodes):
            raise ConfigError(f"--broker {mask_url(url)!r}: several URLs name the nodes of one "
                              "RabbitMQ cluster; each must be amqp:// or amqps://")
        for node in nodes:
            check_broker_url(node)
        return url
    scheme = urlparse(url).scheme
    if scheme not in SCHEMES:
        raise ConfigError(f"--broker {mask_url(url)!r}: use memory:// or "
                          "amqp://user:pass@host:5672/vhost (amqps:// for TLS)")
    if scheme == "memory":
        for name, values in parse_qs(urlparse(url).query, keep_blank_values=True).items():
            if name != "max_message_bytes":
                raise ConfigError(f"--broker: unknown URL parameter {name!r}; memory:// takes "
                                  "max_message_bytes")
            if not values[-1].isdigit() or int(values[-1]) < 1:
                raise ConfigError(f"--broker: max_message_bytes={values[-1]!r}: give a "
                                  "positive number of bytes")
        return url
    rest, tls = split_url(url)
    allowed = AMQP_PARAMS + (TLS_PARAMS if scheme == "amqps" else ())
    for name in [*parse_qs(urlparse(rest).query, keep_blank_values=True), *tls]:
        if name not in allowed:
            hint = " (TLS parameters need amqps://)" if name in TLS_PARAMS else ""
            raise ConfigError(f"--broker: unknown URL parameter {name!r}{hint}; "
                              f"{scheme}:// takes {', '.join(allowed)}")
    if scheme == "amqps":
        parse_options(tls)
    return url
