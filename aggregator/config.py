"""The aggregator's settings: flags > ``DFL_*`` environment > ``--config`` TOML > defaults.

A value that cannot work raises ``ConfigError`` with one line naming the setting and what
it accepts, so a daemon refuses to start instead of failing an hour into a run.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from messages.broker import check_broker_url
from messages.codec import DEFAULT_MAX_BYTES
from messages.settings import DaemonSettings
from messages.topology import check_name
from messages.types import Settings

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/%2F"
Positive = Field(gt=0)


class AggregatorConfig(DaemonSettings):
    """Everything an ``Aggregator`` needs; see ``dfl aggregator --help`` for each option."""

    broker: str = DEFAULT_AMQP_URL
    federation: str = "mnist"
    strategy: Literal["fedasync", "fedbuff", "fedavg"] = "fedasync"
    staleness: Literal["constant", "polynomial", "hinge"] = "polynomial"
    staleness_a: float | None = Field(default=None, gt=0)
    staleness_b: int | None = Field(default=None, ge=0)
    mixing_alpha: float = Field(default=0.6, gt=0, le=1)
    buffer_k: int = Field(default=2, ge=1)
    eta: float = Field(default=1.0, gt=0)
    max_staleness: int = Field(default=50, ge=0)
    min_parties: int = Field(default=2, ge=1)
    lease_seconds: float = Field(default=60.0, gt=0)
    # what parties are told to do (the welcome's settings)
    local_steps: int = Field(default=100, ge=1)
    batch_size: int = Field(default=32, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    # stopping
    target_accuracy: float | None = Field(default=None, gt=0, le=1)
    max_seconds: float | None = Field(default=None, gt=0)
    max_versions: int | None = Field(default=None, ge=1)
    # evaluation and outputs
    evaluate: bool = True
    eval_every_seconds: float = Field(default=5.0, gt=0)
    eval_log: str | None = None
    tensorboard: str | None = None
    save_model: str | None = None
    initial_model: str | None = None
    model: str = "worker.models:mnist_cnn"
    data: str = "worker.data:load_mnist"
    data_dir: str | None = None
    seed: int = 0
    # durability
    checkpoint_dir: str | None = None
    checkpoint_every_updates: int = Field(default=16, ge=1)
    checkpoint_every_seconds: float = Field(default=2.0, gt=0)
    ledger: str | None = None
    # operations
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    # broker tuning
    queue_type: Literal["quorum", "classic"] = "quorum"
    prefetch: int = Field(default=16, ge=1)
    updates_max_length: int | None = Field(default=None, ge=1)
    max_message_bytes: int = Field(default=DEFAULT_MAX_BYTES, ge=1024)

    @field_validator("broker")
    @classmethod
    def _broker(cls, value: str) -> str:
        return check_broker_url(value)

    @field_validator("federation")
    @classmethod
    def _federation(cls, value: str) -> str:
        return check_name("--federation", value)

    @model_validator(mode="after")
    def _consistent(self) -> AggregatorConfig:
        if self.target_accuracy is not None and not self.evaluate:
            raise ValueError("--target-accuracy needs evaluation: drop --no-eval")
        return self

    @property
    def sync(self) -> bool:
        """Synchronous rounds: parties must wait for each new model before training again."""
        return self.strategy == "fedavg"

    def settings(self) -> Settings:
        """The training settings every party receives in its welcome."""
        return {"local_steps": self.local_steps, "batch_size": self.batch_size,
                "learning_rate": self.learning_rate, "sync": self.sync,
                "strategy": self.strategy}
