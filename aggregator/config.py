"""The aggregator's settings: flags > ``DFL_*`` environment > ``--config`` TOML > defaults.

A value that cannot work raises ``ConfigError`` with one line naming the setting and what
it accepts, so a daemon refuses to start instead of failing an hour into a run.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, model_validator

from aggregator.staleness import StalenessKind
from aggregator.strategies import Aggregation, ServerOptimizerName, StrategyName
from messages.daemon.settings import FederationSettings
from messages.secagg.quantize import scale_for
from messages.transport.topology import DEFAULT_DELIVERY_LIMIT, check_name
from messages.types import Settings

SECAGG_CLIP = 100.0
"""Default L2 clip of a masked delta. Above the norms measured for the built-in CNN's deltas
(see docs/privacy.md), so it bounds the fixed point's range without changing an update."""

StartMode = Literal["min-parties", "manual"]
"""When model version 0 is released: once ``min_parties`` parties have joined, or only when
asked (``Aggregator.start_training()``, ``dfl start``, a ``Query("start")`` on F.control)."""
START_MODES: tuple[str, ...] = get_args(StartMode)

Role = Literal["single", "root", "edge"]
"""What an aggregator process does: ``single`` consumes the parties' updates and applies them
(the default); ``edge`` competes with other edges for the updates and forwards each batch as
one partial sum to the ``root``, which applies partial sums instead of updates
(``aggregator.edge``, ``aggregator.partials``)."""
ROLES: tuple[str, ...] = get_args(Role)


class AggregatorConfig(FederationSettings):
    """Everything an ``Aggregator`` needs; see ``dfl aggregator --help`` for each option."""

    strategy: StrategyName = "fedasync"
    staleness: StalenessKind = "polynomial"
    staleness_a: float | None = Field(default=None, gt=0)
    staleness_b: int | None = Field(default=None, ge=0)
    mixing_alpha: float = Field(default=0.6, gt=0, le=1)
    buffer_k: int = Field(default=2, ge=1)
    eta: float = Field(default=1.0, gt=0)
    aggregation: Aggregation = "mean"
    trim_fraction: float = Field(default=0.2, ge=0, lt=0.5)
    max_update_norm: float | None = Field(default=None, gt=0)
    # the server optimizer of every strategy's last step (aggregator/strategies/optimizers.py)
    server_optimizer: ServerOptimizerName = "plain"
    server_beta1: float = Field(default=0.9, ge=0, lt=1)
    server_beta2: float = Field(default=0.99, gt=0, lt=1)
    server_tau: float = Field(default=1e-3, gt=0)
    server_staleness_threshold: int | None = Field(default=None, ge=0)
    max_staleness: int = Field(default=50, ge=0)
    max_delta_abs: float = Field(default=1e4, gt=0)
    min_parties: int = Field(default=2, ge=1)
    start: StartMode = "min-parties"
    lease_seconds: float = Field(default=60.0, gt=0)
    # what parties are told to do (the welcome's settings)
    local_steps: int = Field(default=100, ge=1)
    batch_size: int = Field(default=32, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    proximal_mu: float = Field(default=0.0, ge=0)  # FedProx's mu (worker/training.py)
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
    # durability
    checkpoint_dir: str | None = None
    checkpoint_every_updates: int = Field(default=16, ge=1)
    checkpoint_every_seconds: float = Field(default=2.0, gt=0)
    # authenticity: party public keys / HMAC secrets and the aggregator's own signing key
    keys_dir: str | None = None
    broadcast_interval: float = Field(default=0.1, ge=0)
    # above this many active parties, versions are announced and fetched (distribution.py)
    push_max_parties: int = Field(default=16, ge=0)
    # broker tuning (the shared settings are in FederationSettings)
    # twice the checkpoint batch: acks come a batch at a time, so a window no larger than
    # the batch leaves the broker nothing to send while a checkpoint is written
    prefetch: int = Field(default=32, ge=1)
    # the broker as the last line: deliveries of one message before RabbitMQ dead-letters it
    delivery_limit: int = Field(default=DEFAULT_DELIVERY_LIMIT, ge=1, le=1000)
    # control-plane limits (aggregator.admission)
    max_parties: int = Field(default=1000, ge=1)
    join_rate: float = Field(default=20.0, gt=0)
    # secure aggregation (aggregator/strategies/secure.py; the helper is `dfl helper`)
    secure_aggregation: bool = False
    secagg_clip: float = Field(default=SECAGG_CLIP, gt=0)
    secagg_max_weight: int = Field(default=16, ge=1, le=1 << 16)
    # scale-out (aggregator/edge.py): edges fold updates into partial sums for one root
    role: Role = "single"
    edge_id: str | None = None  # an edge's name (default: edge-<host>-<pid>)
    edge_k: int = Field(default=8, ge=1, le=4096)
    edge_flush_seconds: float = Field(default=0.5, gt=0)
    edge_answer_seconds: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> AggregatorConfig:
        if self.target_accuracy is not None and not self.evaluate:
            raise ValueError("--target-accuracy needs evaluation: drop --no-eval")
        if self.aggregation != "mean" and self.strategy != "fedbuff":
            raise ValueError(f"--aggregation {self.aggregation} needs --strategy fedbuff")
        if self.max_update_norm is not None and self.strategy == "fedavg":
            raise ValueError("--max-update-norm needs --strategy fedasync or fedbuff")
        if self.secure_aggregation:
            self._secure_combination()
        if self.role != "single":
            self._scale_out_combination()
        if self.queue_type == "classic" and self.broker.startswith("amqp"):
            raise ValueError("--queue-type classic: classic queues have no delivery limit on "
                             "RabbitMQ 3.x, so a message that crashes the aggregator would be "
                             "redelivered forever; use --queue-type quorum")
        return self

    def _secure_combination(self) -> None:
        """What secure aggregation cannot do, refused with the reason."""
        if self.strategy != "fedbuff":
            raise ValueError(f"--secure-aggregation needs --strategy fedbuff, not "
                             f"{self.strategy}: only a buffer of several parties' updates can "
                             "be unmasked without revealing one")
        if self.aggregation != "mean":
            raise ValueError(f"--secure-aggregation with --aggregation {self.aggregation}: a "
                             "median or trimmed mean needs every coordinate of every update, "
                             "which masking hides; use --aggregation mean")
        if self.max_update_norm is not None:
            raise ValueError("--secure-aggregation with --max-update-norm: the aggregator "
                             "cannot measure a masked delta's norm; parties clip to "
                             "--secagg-clip themselves")
        if self.buffer_k < 3:
            raise ValueError(f"--secure-aggregation needs --buffer-k >= 3 (got "
                             f"{self.buffer_k}): the helper answers only for sets of at least "
                             "3 distinct parties")

    def _scale_out_combination(self) -> None:
        """What edge and root cannot do, refused with the reason."""
        if self.strategy != "fedbuff" or self.aggregation != "mean":
            raise ValueError(f"--role {self.role} needs --strategy fedbuff with --aggregation "
                             "mean: only a weighted mean can be summed in parts")
        if self.secure_aggregation:
            raise ValueError(f"--role {self.role} with --secure-aggregation: masked buffers "
                             "are unmasked by one leader; run a single aggregator")
        if self.max_update_norm is not None:
            raise ValueError(f"--role {self.role} with --max-update-norm: clipping is not "
                             "applied to partial sums; clip on the parties (--dp-clip)")
        if self.edge_id is not None:
            check_name("--edge-id", self.edge_id)

    def _missing_keys(self) -> tuple[list[str], str]:
        if self.keys_dir:
            return [], ""
        return ["--keys"], ("make keys with `dfl admin add-aggregator --keys DIR` and "
                            "`dfl admin add-party ID --keys DIR`, then pass --keys DIR")

    @property
    def sync(self) -> bool:
        """Synchronous rounds: parties must wait for each new model before training again."""
        return self.strategy == "fedavg"

    def settings(self) -> Settings:
        """The training settings every party receives in its welcome."""
        settings: Settings = {"local_steps": self.local_steps, "batch_size": self.batch_size,
                              "learning_rate": self.learning_rate, "sync": self.sync,
                              "strategy": self.strategy}
        if self.proximal_mu > 0:  # sent only when used: older parties never see it
            settings["proximal_mu"] = self.proximal_mu
        if self.secure_aggregation:
            settings.update(secure_aggregation=True, secagg_clip=self.secagg_clip,
                            secagg_scale=scale_for(self.secagg_clip, self.buffer_k,
                                                   self.secagg_max_weight))
        return settings
