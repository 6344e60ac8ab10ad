"""The worker's settings, checked once at construction (``ConfigError`` names the fix)."""

from __future__ import annotations

from dataclasses import dataclass

from messages.broker import check_broker_url
from messages.codec import DEFAULT_MAX_BYTES
from messages.errors import ConfigError
from messages.topology import QUEUE_TYPES
from worker.partition import SCHEMES

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/%2F"


@dataclass(slots=True)
class WorkerConfig:
    """Everything a ``Worker`` needs; see ``dfl worker --help`` for each option."""

    party_id: int = 0
    num_parties: int = 2
    broker: str = DEFAULT_AMQP_URL
    federation: str = "mnist"
    partition: str = "iid"
    alpha: float = 0.5
    shards_per_party: int = 2
    data_dir: str | None = None
    model: str = "worker.models:mnist_cnn"
    data: str = "worker.data:load_mnist"
    seed: int = 0
    heartbeat_seconds: float = 5.0
    join_timeout: float = 10.0
    queue_type: str = "quorum"
    updates_max_length: int | None = None
    ledger: str | None = None
    slowdown: float = 1.0
    max_message_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        check_broker_url(self.broker)
        if self.num_parties < 1:
            raise ConfigError(f"--num-parties {self.num_parties}: must be at least 1")
        if not 0 <= self.party_id < self.num_parties:
            raise ConfigError(f"--party-id {self.party_id}: must be in 0..{self.num_parties - 1} "
                              f"(one shard per party of --num-parties {self.num_parties})")
        if self.partition not in SCHEMES:
            raise ConfigError(f"--partition {self.partition!r}: use one of {', '.join(SCHEMES)}")
        if self.queue_type not in QUEUE_TYPES:
            raise ConfigError(f"--queue-type {self.queue_type!r}: use one of "
                              f"{', '.join(QUEUE_TYPES)}")
        if not self.alpha > 0:
            raise ConfigError(f"--alpha {self.alpha}: the Dirichlet concentration must be > 0")
        if self.slowdown < 1:
            raise ConfigError(f"--slowdown {self.slowdown}: must be >= 1 (1 = full speed)")
        for name, value in (("--heartbeat-seconds", self.heartbeat_seconds),
                            ("--join-timeout", self.join_timeout)):
            if not value > 0:
                raise ConfigError(f"{name} {value}: must be greater than 0")

    @property
    def party(self) -> str:
        """The party's id on the wire and in queue names."""
        return str(self.party_id)
