"""``connect(url)``: the one place where a URL scheme picks a ``Broker`` implementation.

The interface (``messages.transport.broker``) knows no implementation, and each
implementation imports only the interface, so there is no import circle.

Several URLs (``broker_urls``) are the nodes of one RabbitMQ cluster: ``connect`` tries them
in turn, starting with the node that last worked for the same list, and returns the first
connection that opens; the returned broker's ``url`` says which node it is. Only when every
node fails does it raise ``ConnectionLost``, so the daemons' supervisors back off exactly as
with one node (``messages.transport.supervisor``).
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlparse

from messages.errors import ConnectionLost
from messages.transport.broker import Broker, broker_urls, check_broker_url, mask_url

log = logging.getLogger("dfl.broker")
_last_good: dict[str, int] = {}  # node list -> the index of the node that last worked


def connect(url: str, **options: Any) -> Broker:
    """Open a broker connection for ``url``: ``memory://[name][?max_message_bytes=N]``,
    ``amqp://`` or ``amqps://``, or several ``amqp(s)://`` URLs separated by commas.

    Raises ``ConfigError`` for other schemes, unknown URL parameters or missing TLS files,
    ``ConnectionLost`` when no node can be reached (retrying may help) and
    ``AccessRefused`` when a node refuses us (``TLSRefused`` for a failed TLS handshake): a
    refusal is a configuration fault, not a node to fail over from.
    """
    nodes = broker_urls(check_broker_url(url))
    if len(nodes) == 1:
        return _connect_one(nodes[0], **options)
    first = _last_good.get(url, 0)
    errors = []
    for i in [*range(first, len(nodes)), *range(first)]:
        try:
            broker = _connect_one(nodes[i], **options)
        except ConnectionLost as exc:
            errors.append(str(exc))
            continue
        if i != first:
            log.info("broker node %s unreachable; connected to %s instead",
                     mask_url(nodes[first]), mask_url(nodes[i]))
        _last_good[url] = i
        return broker
    raise ConnectionLost(f"none of the {len(nodes)} broker nodes is reachable: "
                         + "; ".join(errors))


def _connect_one(url: str, **options: Any) -> Broker:
    if urlparse(url).scheme == "memory":
        from messages.transport.memory import MemoryBroker

        return MemoryBroker(url)
    # imported on first use: pika loads only in processes that talk to RabbitMQ
    from messages.transport.rabbitmq import RabbitBroker

    return RabbitBroker(url, **options)
