"""``amqp://`` and ``amqps://``: RabbitMQ through pika. The only module that imports pika.

One BlockingConnection with one channel in publisher-confirm mode. pika's errors are turned
into the project's tree here (``ConnectionLost`` when reconnecting can help, ``AccessRefused``
when the broker refused on purpose, ``TLSRefused`` when the TLS handshake failed), so callers
never catch pika types. ``amqps://`` URLs carry their TLS settings as query parameters
(``messages.transport.tls``), which are taken out before pika sees the URL.
"""

from __future__ import annotations

import ssl
import struct
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

import pika
import pika.exceptions as pe

from messages.errors import (
    AccessRefused,
    BrokerError,
    ConfigError,
    ConnectionLost,
    PublishRejected,
    ResourceLocked,
    TLSRefused,
)
from messages.transport import tls
from messages.transport.broker import (
    Broker,
    Delivery,
    Handler,
    check_broker_url,
    check_headers,
    mask_url,
)
from messages.wire.deadletters import ENVELOPE_ERROR_HEADER

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
_pika_decode_properties = pika.spec.BasicProperties.decode


def _decode_properties(self: Any, encoded: bytes, offset: int = 0) -> Any:
    """pika's ``BasicProperties.decode``, but a header table it cannot read never fails.

    RabbitMQ accepts header tables that pika's decoder raises on (a timestamp past
    ``datetime``'s range, tables nested a few hundred deep). pika decodes properties while it
    reads frames, so the exception would close the whole connection before any handler ran,
    and the message, back in its queue, would close the next connection too: a reconnect loop
    that reads as a broker outage. pika has no hook for this (nor does any client we could
    swap in without leaving pika), hence the replacement, installed once below. The table is
    skipped by its length prefix and the delivery arrives with ``ENVELOPE_ERROR_HEADER``
    alone, so that its consumer dead-letters it (the broker keeps the original bytes).
    """
    try:
        return _pika_decode_properties(self, encoded, offset)
    except Exception as exc:  # whatever pika's table decoder raised: the table is the cause
        flags = struct.unpack_from(">H", encoded, offset)[0]
        if not flags & pika.spec.BasicProperties.FLAG_HEADERS or flags & 1:
            raise  # not a header table problem (or flag words we never see): pika's error
        at = offset + 2
        for flag in (pika.spec.BasicProperties.FLAG_CONTENT_TYPE,
                     pika.spec.BasicProperties.FLAG_CONTENT_ENCODING):
            if flags & flag:
                at += 1 + encoded[at]
        size = struct.unpack_from(">I", encoded, at)[0]
        rest = (struct.pack(">H", flags & ~pika.spec.BasicProperties.FLAG_HEADERS)
                + encoded[offset + 2:at] + encoded[at + 4 + size:])
        result = _pika_decode_properties(self, rest, 0)
        self.headers = {ENVELOPE_ERROR_HEADER: f"header table not decodable: "
                                               f"{type(exc).__name__}"}
        return result


pika.spec.BasicProperties.decode = _decode_properties
# Broker close codes that retrying cannot fix: access refused, precondition failed (a queue
# declared with other arguments), not allowed (vhost), and resource locked (exclusive queue).
_REFUSALS = {403, 405, 406, 530}


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """Map pika's exceptions onto the project's at the boundary."""
    try:
        yield
    except (pe.UnroutableError, pe.NackError) as exc:
        raise PublishRejected(f"{what}: broker did not take the message ({exc})") from None
    except (pe.ChannelClosedByBroker, pe.ConnectionClosedByBroker) as exc:
        text = f"{what}: {exc.reply_code} {exc.reply_text}"
        if exc.reply_code == 405:
            raise ResourceLocked(text) from None
        if exc.reply_code in _REFUSALS:
            raise AccessRefused(text) from None
        if exc.reply_code == 404:
            raise AccessRefused(text) from None
        raise ConnectionLost(text) from None
    except (pe.ProbableAuthenticationError, pe.AuthenticationError) as exc:
        raise AccessRefused(f"{what}: login refused, check the user and password ({exc})"
                            ) from None
    except pe.ProbableAccessDeniedError as exc:
        # pika names every connection lost while opening the vhost a "probable denial"; the
        # broker's own refusal carries its close code 530 (NOT_ALLOWED). A reset at that stage
        # (a loaded broker, seen in CI) is an outage to retry, not a refusal to stop for.
        if "(530)" in str(exc) or "NOT_ALLOWED" in str(exc):
            raise AccessRefused(f"{what}: access to the vhost refused ({exc})") from None
        raise ConnectionLost(f"{what}: the connection dropped while opening the vhost "
                             f"({exc})") from None
    except (pe.AMQPConnectionError, pe.AMQPChannelError, pe.ChannelWrongStateError,
            pe.ConnectionWrongStateError, ConnectionError, OSError) as exc:
        raise ConnectionLost(f"{what}: {type(exc).__name__} {exc}") from None
    except pe.AMQPError as exc:
        raise BrokerError(f"{what}: {type(exc).__name__} {exc}") from None


class RabbitBroker(Broker):
    """A connection to RabbitMQ; see ``messages.transport.broker.Broker`` for the semantics."""

    def __init__(self, url: str, *, heartbeat: int | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        """Connect to ``url``; ``ssl_context`` replaces the one built from its TLS parameters."""
        super().__init__()
        self.url = url
        pika_url, tls_params = tls.split_url(check_broker_url(url))
        try:
            params = pika.URLParameters(pika_url)
        except ValueError as exc:  # e.g. heartbeat=soon
            raise ConfigError(f"--broker {mask_url(url)!r}: {exc}") from None
        if heartbeat is not None:
            params.heartbeat = heartbeat
        options = tls.parse_options(tls_params)
        if ssl_context is not None or params.ssl_options is not None:
            # pika made a default context for amqps://; ours adds cacertfile, our certificate
            # and the verify mode, and checks the name the certificate must carry.
            params.ssl_options = pika.SSLOptions(ssl_context or tls.context(options),
                                                 options.server_name or urlparse(url).hostname)
        params.connection_attempts = 1
        # A resource alarm blocks publishers; without a timeout a blocked broadcast would
        # wait forever, and the aggregator could not consume the backlog that caused it.
        if params.blocked_connection_timeout is None:
            params.blocked_connection_timeout = 120
        with _translated(f"connecting to {mask_url(url)}"):
            self._conn = self._open(params, options)
            self._ch = self._conn.channel()
            self._ch.confirm_delivery()
        self._replying = False

    @staticmethod
    def _open(params: Any, options: tls.TLSOptions) -> Any:
        """A BlockingConnection; a TLS handshake that failed for good raises ``TLSRefused``.

        A refused TLS handshake is a configuration fault (an untrusted CA, a missing client
        certificate): raising ``ConnectionLost`` would have the supervisor retry it forever.
        """
        where = f"{params.host}:{params.port}"
        try:
            return pika.BlockingConnection(params)
        except ssl.SSLError as exc:  # our side of the handshake failed (pika re-raises it)
            line = tls.explain(exc, where, options)
            if line is None:
                raise
            raise TLSRefused(line) from None
        except (pe.IncompatibleProtocolError, pe.StreamLostError):
            # The broker dropped us during the handshake: with TLS 1.3 that is how a refused
            # client certificate looks to pika. Ask the broker once more, and listen.
            opts = params.ssl_options
            refusal = None if opts is None else tls.probe(params.host, params.port,
                                                          opts.context, opts.server_hostname)
            line = None if refusal is None else tls.explain(refusal, where, options)
            if line is None:
                raise
            raise TLSRefused(line) from None

    def _channel(self) -> Any:
        """The channel, reopened if the broker closed it after a refused operation."""
        if not self._ch.is_open:
            with _translated("reopening the channel"):
                self._ch = self._conn.channel()
                self._ch.confirm_delivery()
                self._replying = False
        return self._ch

    # -- topology --------------------------------------------------------------------------
    def declare_exchange(self, name: str, kind: str = "fanout", *, durable: bool = True) -> None:
        with _translated(f"declaring exchange {name!r}"):
            self._channel().exchange_declare(exchange=name, exchange_type=kind, durable=durable)

    def declare_queue(self, name: str, *, durable: bool = True, exclusive: bool = False,
                      auto_delete: bool = False, arguments: Mapping[str, Any] | None = None
                      ) -> None:
        with _translated(f"declaring queue {name!r}"):
            self._channel().queue_declare(queue=name, durable=durable, exclusive=exclusive,
                                          auto_delete=auto_delete,
                                          arguments=dict(arguments or {}))

    def bind(self, queue: str, exchange: str, routing_key: str = "") -> None:
        with _translated(f"binding {queue!r} to {exchange!r}"):
            self._channel().queue_bind(queue=queue, exchange=exchange, routing_key=routing_key)

    def delete_queue(self, name: str) -> None:
        with _translated(f"deleting queue {name!r}"):
            self._channel().queue_delete(queue=name)

    def queue_depth(self, name: str) -> int:
        with _translated(f"inspecting queue {name!r}"):
            ok = self._channel().queue_declare(queue=name, passive=True)
        return int(ok.method.message_count)

    def exists(self, name: str, *, exchange: bool = False) -> bool:
        with _translated(f"looking for {name!r}"):
            ch = self._channel()
            try:
                if exchange:
                    ch.exchange_declare(exchange=name, passive=True)
                else:
                    ch.queue_declare(queue=name, passive=True)
            except pe.ChannelClosedByBroker as exc:
                if exc.reply_code == 404:  # the broker closed the channel; reopened on next use
                    return False
                raise
        return True

    # -- publishing ------------------------------------------------------------------------
    def publish(self, exchange: str, routing_key: str, body: bytes, *,
                headers: Mapping[str, Any] | None = None, persistent: bool = True,
                mandatory: bool = False, reply_to: str | None = None,
                correlation_id: str | None = None) -> None:
        props = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent if persistent else None,
            headers=check_headers(headers) or None, reply_to=reply_to,
            correlation_id=correlation_id)
        with _translated(f"publishing to {exchange or routing_key!r}"):
            self._channel().basic_publish(exchange=exchange, routing_key=routing_key, body=body,
                                          properties=props, mandatory=mandatory)

    # -- consuming -------------------------------------------------------------------------
    def consume(self, queue: str, handler: Handler, *, prefetch: int = 0,
                auto_ack: bool = False) -> str:
        def on_message(_ch: Any, method: Any, props: Any, body: bytes) -> None:
            handler(Delivery(body, method.delivery_tag, queue, dict(props.headers or {}),
                             bool(method.redelivered), props.reply_to, props.correlation_id))

        with _translated(f"consuming {queue!r}"):
            ch = self._channel()
            if not auto_ack:
                ch.basic_qos(prefetch_count=prefetch)
            return str(ch.basic_consume(queue=queue, on_message_callback=on_message,
                                        auto_ack=auto_ack))

    def cancel(self, consumer_tag: str) -> None:
        with _translated("cancelling a consumer"):
            self._channel().basic_cancel(consumer_tag)

    def ack(self, delivery: Delivery, *, multiple: bool = False) -> None:
        with _translated("acking"):
            self._ch.basic_ack(delivery_tag=delivery.tag, multiple=multiple)

    def nack(self, delivery: Delivery, *, requeue: bool = False) -> None:
        with _translated("nacking"):
            self._ch.basic_nack(delivery_tag=delivery.tag, requeue=requeue)

    def get(self, queue: str) -> Delivery | None:
        with _translated(f"getting from {queue!r}"):
            method, props, body = self._channel().basic_get(queue=queue, auto_ack=True)
        if method is None:
            return None
        return Delivery(body, method.delivery_tag, queue, dict(props.headers or {}),
                        bool(method.redelivered), props.reply_to, props.correlation_id)

    # -- request/reply ---------------------------------------------------------------------
    def reply_address(self) -> str:
        if not self._replying:
            # Direct reply-to: no reply queue to declare; the consumer must exist before the
            # request is published.
            self.consume(DIRECT_REPLY_TO, self._on_reply, auto_ack=True)
            self._replying = True
        return DIRECT_REPLY_TO

    # -- event loop ------------------------------------------------------------------------
    def process_events(self, timeout: float) -> None:
        with _translated("processing events"):
            self._conn.process_data_events(time_limit=max(timeout, 0.0))

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        with _translated("scheduling a callback"):
            self._conn.add_callback_threadsafe(fn)

    def close(self) -> None:
        try:
            if self._conn.is_open:
                self._conn.close()
        except pe.AMQPError:
            pass  # closing a connection that is already going away is not an error
