"""``connect(url)``: the one place where a URL scheme picks a ``Broker`` implementation.

The interface (``messages.transport.broker``) knows no implementation, and each
implementation imports only the interface, so there is no import circle.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from messages.transport.broker import Broker, check_broker_url


def connect(url: str, **options: Any) -> Broker:
    """Open a broker connection for ``url``: ``memory://[name][?max_message_bytes=N]``,
    ``amqp://`` or ``amqps://``.

    Raises ``ConfigError`` for other schemes, unknown URL parameters or missing TLS files,
    ``ConnectionLost`` when the broker cannot be reached (retrying may help) and
    ``AccessRefused`` when it refuses us (``TLSRefused`` for a failed TLS handshake).
    """
    scheme = urlparse(check_broker_url(url)).scheme
    if scheme == "memory":
        from messages.transport.memory import MemoryBroker

        return MemoryBroker(url)
    # imported on first use: pika loads only in processes that talk to RabbitMQ
    from messages.transport.rabbitmq import RabbitBroker

    return RabbitBroker(url, **options)
