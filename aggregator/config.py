"""The aggregator's settings, checked once at construction.

A value that cannot work raises ``ConfigError`` with one line naming the setting and what
it accepts, so a daemon refuses to start instead of failing an hour into a run.
"""

from __future__ import annotations

from dataclasses import dataclass

from aggregator.staleness import STALENESS_FUNCTIONS
from aggregator.strategies import STRATEGIES
from messages.broker import check_broker_url
from messages.codec import DEFAULT_MAX_BYTES
from messages.errors import ConfigError
from messages.topology import QUEUE_TYPES, check_name
from messages.types import Settings

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/%2F"


@dataclass(slots=True)
class AggregatorConfig:
    """Everything an ``Aggregator`` needs; see ``dfl aggregator --help`` for each option."""

    broker: str = DEFAULT_AMQP_URL
    federation: str = "mnist"
    strategy: str = "fedasync"
    staleness: str = "polynomial"
    staleness_a: float | None = None
    staleness_b: int | None = None
    mixing_alpha: float = 0.6
    buffer_k: int = 2
    eta: float = 1.0
    max_staleness: int = 50
    min_parties: int = 2
    lease_seconds: float = 60.0
    # what parties are told to do (the welcome's settings)
    local_steps: int = 100
    batch_size: int = 32
    learning_rate: float = 1e-3
    # stopping
    target_accuracy: float | None = None
    max_seconds: float | None = None
    max_versions: int | None = None
    # evaluation
    evaluate: bool = True
    eval_every_seconds: float = 5.0
    eval_log: str | None = None
    save_model: str | None = None
    model: str = "worker.models:mnist_cnn"
    data: str = "worker.data:load_mnist"
    data_dir: str | None = None
    seed: int = 0
    # durability
    checkpoint_dir: str | None = None
    checkpoint_every_updates: int = 16
    checkpoint_every_seconds: float = 2.0
    ledger: str | None = None
    # broker tuning
    queue_type: str = "quorum"
    prefetch: int = 16
    updates_max_length: int | None = None
    max_message_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        check_broker_url(self.broker)
        check_name("--federation", self.federation)
        _one_of("--strategy", self.strategy, STRATEGIES)
        _one_of("--staleness", self.staleness, STALENESS_FUNCTIONS)
        _one_of("--queue-type", self.queue_type, QUEUE_TYPES)
        if not 0 < self.mixing_alpha <= 1:
            raise ConfigError(f"--mixing-alpha {self.mixing_alpha}: the FedAsync mixing weight "
                              "must be in (0, 1]")
        for name, value in (("--buffer-k", self.buffer_k), ("--min-parties", self.min_parties),
                            ("--local-steps", self.local_steps),
                            ("--batch-size", self.batch_size), ("--prefetch", self.prefetch),
                            ("--checkpoint-every-updates", self.checkpoint_every_updates)):
            if value < 1:
                raise ConfigError(f"{name} {value}: must be at least 1")
        for name, fvalue in (("--eta", self.eta), ("--learning-rate", self.learning_rate),
                             ("--eval-every-seconds", self.eval_every_seconds),
                             ("--lease-seconds", self.lease_seconds),
                             ("--checkpoint-every-seconds", self.checkpoint_every_seconds)):
            if not fvalue > 0:
                raise ConfigError(f"{name} {fvalue}: must be greater than 0")
        if self.updates_max_length is not None and self.updates_max_length < 1:
            raise ConfigError(f"--updates-max-length {self.updates_max_length}: must be >= 1")
        if self.max_staleness < 0:
            raise ConfigError(f"--max-staleness {self.max_staleness}: must be >= 0")
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise ConfigError(f"--target-accuracy {self.target_accuracy}: give a fraction in "
                              "(0, 1], e.g. 0.98")
        if self.target_accuracy is not None and not self.evaluate:
            raise ConfigError("--target-accuracy needs evaluation: drop --no-eval")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ConfigError(f"--max-seconds {self.max_seconds}: must be greater than 0")
        if self.max_versions is not None and self.max_versions < 1:
            raise ConfigError(f"--max-versions {self.max_versions}: must be at least 1")

    @property
    def sync(self) -> bool:
        """Synchronous rounds: parties must wait for each new model before training again."""
        return self.strategy == "fedavg"

    def settings(self) -> Settings:
        """The training settings every party receives in its welcome."""
        return {"local_steps": self.local_steps, "batch_size": self.batch_size,
                "learning_rate": self.learning_rate, "sync": self.sync,
                "strategy": self.strategy}


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} {value!r}: use one of {', '.join(allowed)}")
