"""The project's one exception tree.

Every error the framework raises on purpose is a ``FederationError``, so callers can catch
one class; transport errors (pika, sockets) are translated into it at the broker boundary.

::

    FederationError
    ├── ConfigError            a setting or option value that cannot work; fix and restart
    ├── InvalidMessage(reason) a message that failed decoding or validation; dead-letter it
    ├── PluginError            a model/data plug-in path that cannot be loaded
    ├── DataError              MNIST (or a plug-in dataset) could not be found or read
    ├── StateError             the daemon's own state went bad (a checkpoint not written); stop
    └── BrokerError
        ├── ConnectionLost     the broker went away; reconnecting can fix it
        ├── AccessRefused      credentials, permissions or topology refused; retrying cannot fix it
        │   ├── ResourceLocked an exclusive queue is held by another connection
        │   └── TLSRefused     the TLS handshake failed: an untrusted certificate on either side
        ├── PublishRejected    the broker nacked a publish (e.g. queue full); retry later
        └── RpcTimeout         no reply to an RPC within its deadline
"""

from __future__ import annotations


class FederationError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(FederationError):
    """A configuration value that cannot work; the message says how to fix it."""


class PluginError(FederationError):
    """A ``package.module:function`` plug-in path that cannot be imported or called."""


class DataError(FederationError):
    """Training or test data could not be located or parsed."""


class InvalidMessage(FederationError):
    """A message failed decoding or validation.

    ``reason`` is a short machine-readable slug (it becomes the dead-letter header), and the
    text says what exactly was wrong, for the log.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class StateError(FederationError):
    """The daemon's own state cannot be trusted or kept (a checkpoint that cannot be written,
    a strategy that failed half-way through an apply): the one failure that stops a daemon
    while it handles a message. A restart resumes from the last checkpoint."""


class BrokerError(FederationError):
    """Something went wrong talking to the message broker."""


class ConnectionLost(BrokerError):
    """The connection or channel dropped; a supervisor may reconnect."""


class AccessRefused(BrokerError):
    """The broker refused us on purpose (credentials, permissions, declared arguments).

    Reconnecting cannot fix this, so daemons stop with this message instead of looping.
    """


class ResourceLocked(AccessRefused):
    """An exclusive queue is in use by another connection (RabbitMQ's RESOURCE_LOCKED)."""


class TLSRefused(AccessRefused):
    """The TLS handshake failed for a reason retrying cannot fix: we do not trust the broker's
    certificate (or it names another host), or the broker refused ours or its absence."""


class PublishRejected(BrokerError):
    """The broker nacked or returned a publish; the message was not stored."""


class RpcTimeout(BrokerError):
    """An RPC got no reply within its deadline."""
