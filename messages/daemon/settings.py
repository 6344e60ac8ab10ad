"""Daemon settings from flags > environment (``DFL_*``) > a TOML file (``--config``) > defaults.

Both daemons' configurations derive from ``DaemonSettings`` (pydantic-settings), so every
option can come from any of the three places under the same name: ``--min-parties 3``,
``DFL_MIN_PARTIES=3``, or ``min_parties = 3`` in the TOML file. A value that cannot work is
refused at construction with ``ConfigError``: one line naming the setting, where it may come
from, and what it accepts.
"""

from __future__ import annotations

import contextvars
import ipaddress
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from messages.errors import ConfigError
from messages.transport.broker import broker_urls, check_broker_url, mask_url
from messages.transport.topology import QueueType, check_name
from messages.wire.chunks import (
    DEFAULT_CHUNK_TIMEOUT,
    DEFAULT_MAX_CHUNK_BYTES,
    DEFAULT_MAX_PENDING_BYTES,
    DEFAULT_MAX_PENDING_CHUNKS,
)
from messages.wire.codec import DEFAULT_MAX_BYTES

ENV_PREFIX = "DFL_"
DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/%2F"
_CONFIG_FILE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("dfl_config",
                                                                          default=None)


def describe(error: ValidationError) -> str:
    """The first problem of a validation error as one line an operator can act on."""
    first = error.errors()[0]
    name = str(first["loc"][0]) if first["loc"] else ""
    message = str(first["msg"]).removeprefix("Value error, ")
    if not name:  # a check across settings already names them
        return message
    value = first.get("input")
    shown = "" if isinstance(value, dict) or value is None else f" {value!r}"
    return (f"--{name.replace('_', '-')}{shown}: {message} "
            f"(set by the flag, {ENV_PREFIX}{name.upper()}, or {name} in --config)")


def remote_broker_host(url: str) -> str | None:
    """The host of an ``amqp://``/``amqps://`` broker that is not on the loopback interface.

    ``None`` for ``memory://`` and for loopback brokers: ``localhost``, an address in
    127.0.0.0/8, ``::1``, or no host at all (pika then dials localhost). Any other name is
    remote: nothing is looked up, since a name can resolve elsewhere tomorrow.
    """
    parts = urlparse(url)
    if parts.scheme not in ("amqp", "amqps"):
        return None
    host = parts.hostname or ""
    if host in ("", "localhost"):
        return None
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:  # a name, not an address
        return host
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return None if (mapped or address).is_loopback else host


class DaemonSettings(BaseSettings):
    """Base of ``AggregatorConfig`` and ``WorkerConfig``: layered sources, one-line errors."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid",
                                      validate_default=True)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(describe(exc)) from None

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _CONFIG_FILE.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @classmethod
    def load(cls, flags: dict[str, Any], config_file: str | None = None) -> Any:
        """Settings from explicit ``flags``, then ``DFL_*`` variables, then ``config_file``."""
        path = Path(config_file) if config_file else None
        if path is not None and not path.is_file():
            raise ConfigError(f"--config {config_file!r}: no such file; give a TOML file of "
                              "settings (option names with underscores)")
        token = _CONFIG_FILE.set(path)
        try:
            return cls(**flags)
        except ConfigError:
            raise
        except Exception as exc:  # a TOML syntax error
            raise ConfigError(f"--config {config_file!r}: {exc}") from None
        finally:
            _CONFIG_FILE.reset(token)

    def __repr_args__(self) -> Any:
        """``repr`` and ``str`` mask passwords too: settings end up in logs and tracebacks."""
        for name, value in super().__repr_args__():
            yield name, mask_url(value) if isinstance(value, str) and "://" in value else value

    def effective(self) -> str:
        """The settings in force, one ``name=value`` per line, passwords masked."""
        lines = []
        for name, value in self.model_dump().items():
            if isinstance(value, str) and "://" in value:
                value = mask_url(value)
            lines.append(f"  {name} = {value!r}")
        return "\n".join(lines)


class FederationSettings(DaemonSettings):
    """The settings every process of a federation shares (and must agree on)."""

    broker: str = DEFAULT_AMQP_URL
    federation: str = "mnist"
    data_dir: str | None = None
    model: str = "worker.models:mnist_cnn"
    data: str = "worker.data:load_mnist"
    seed: int = 0
    ledger: str | None = None
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    liveness_seconds: float = Field(default=30.0, gt=0)  # /livez: loop ticked within
    queue_type: QueueType = "quorum"
    updates_max_length: int | None = Field(default=None, ge=1)
    max_message_bytes: int = Field(default=DEFAULT_MAX_BYTES, ge=1024)
    # bodies over max_chunk_bytes travel in chunks (messages.wire.chunks): keep it under the
    # broker's max_message_size (16 MiB by default on RabbitMQ 4.x)
    max_chunk_bytes: int = Field(default=DEFAULT_MAX_CHUNK_BYTES, ge=1024)
    chunk_timeout: float = Field(default=DEFAULT_CHUNK_TIMEOUT, gt=0)
    # what a receiver holds of incomplete chunk sets, in all (messages.wire.chunks)
    max_pending_chunk_bytes: int = Field(default=DEFAULT_MAX_PENDING_BYTES, ge=1024)
    max_pending_chunks: int = Field(default=DEFAULT_MAX_PENDING_CHUNKS, ge=1)

    @field_validator("broker", mode="before")
    @classmethod
    def _broker_nodes(cls, value: Any) -> Any:
        """A list in a settings file names the nodes of one cluster, as commas do in a flag."""
        if isinstance(value, list | tuple):
            return ",".join(str(node) for node in value)
        return value

    @field_validator("broker")
    @classmethod
    def _broker(cls, value: str) -> str:
        return check_broker_url(value)

    @field_validator("federation")
    @classmethod
    def _federation(cls, value: str) -> str:
        return check_name("--federation", value)

    # --insecure: accept unsigned messages over a broker that is not on this machine
    insecure: bool = False

    def _missing_keys(self) -> tuple[list[str], str]:
        """The key options this role lacks to sign and verify, and how to get them."""
        return [], ""

    @property
    def unsigned_remote(self) -> str | None:
        """The host of a remote broker this process would talk to without its keys."""
        hosts = [h for node in broker_urls(self.broker)
                 if (h := remote_broker_host(node)) is not None]
        return hosts[0] if hosts and self._missing_keys()[0] else None

    def insecure_warning(self) -> str | None:
        """The start-up warning of a process running ``--insecure`` over a remote broker."""
        host = self.unsigned_remote
        if host is None:
            return None
        missing = " and ".join(self._missing_keys()[0])
        return (f"--insecure: without {missing}, messages are not signed and checked over the "
                f"broker at {host}, which is not on this machine: anyone who can publish there "
                "can forge updates, models and stops (make keys with `dfl admin`)")

    @model_validator(mode="after")
    def _secure_by_default(self) -> FederationSettings:
        host = self.unsigned_remote
        if host is not None and not self.insecure:
            missing, fix = self._missing_keys()
            raise ValueError(f"--broker {host} is not on this machine (localhost, 127.0.0.0/8, "
                             f"::1), so messages must be signed, but {' and '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} not given: {fix}, or "
                             "pass --insecure (DFL_INSECURE=true) to accept unsigned messages")
        return self
