"""The seam between the worker daemon and local training: ``Trainer`` and its factory.

``Worker(config, trainer_factory=...)`` builds its trainer with ``trainer_factory(config,
party_id)`` on the training thread's side (``build_trainer`` by default: the data plug-in,
this party's shard, a Keras ``LocalTrainer``). To change what training does (time it, record
norms, scale deltas for an attack benchmark), wrap the default one:

    class Timed(TrainerWrapper):
        def train(self, base, steps, batch_size, learning_rate, *, proximal_mu=0.0):
            began = time.perf_counter()
            try:
                return self.inner.train(base, steps, batch_size, learning_rate,
                                        proximal_mu=proximal_mu)
            finally:
                record(time.perf_counter() - began)

    Worker(config, trainer_factory=lambda cfg, pid: Timed(build_trainer(cfg, pid)))

A ``Trainer`` must provide what the daemon reads: ``names`` (tensor names in model order),
``y`` (the shard's labels: the sample count), ``interrupted`` (an ``Event`` that makes
``train`` return ``None`` early), ``initial()`` (the freshly initialised weights, sent with the
join) and ``train(base, steps, batch_size, learning_rate, *, proximal_mu=0.0)`` returning
the delta and local metrics, or ``None`` when interrupted (``proximal_mu`` > 0: FedProx's
term ``mu/2 * ||w - base||^2`` in the local loss, from the welcome's settings; a trainer
that cannot add it raises ``FederationError`` rather than train without it). Keras is
imported only when a trainer is built.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from messages.daemon.plugins import load_dataset
from messages.errors import FederationError
from messages.types import NDArray, NDArrays, Tensors
from worker.partition import partition_indices

if TYPE_CHECKING:
    from worker.config import WorkerConfig

log = logging.getLogger("dfl.worker")
TrainResult = tuple[NDArrays, dict[str, float]] | None


class StopTraining(FederationError):
    """Raised by ``train`` when this party must not train any more (e.g. ``--target-epsilon``
    reached); the message is the reason the worker stops with."""


class Trainer(Protocol):
    """What the worker daemon needs of local training (see the module docstring)."""

    names: list[str]
    y: NDArray
    interrupted: threading.Event

    def initial(self) -> Tensors: ...

    def train(self, base: NDArrays, steps: int, batch_size: int, learning_rate: float,
              *, proximal_mu: float = 0.0) -> TrainResult: ...


TrainerFactory = Callable[["WorkerConfig", int], Trainer]


class TrainerWrapper:
    """A ``Trainer`` that delegates to ``inner``; override ``train`` to add behaviour."""

    def __init__(self, inner: Trainer) -> None:
        self.inner = inner
        self.names = inner.names
        self.y = inner.y
        self.interrupted = inner.interrupted

    def __getattr__(self, name: str) -> Any:
        """Anything else is the inner trainer's (e.g. a ``LocalTrainer``'s Keras model)."""
        return getattr(self.inner, name)

    def initial(self) -> Tensors:
        return self.inner.initial()

    def train(self, base: NDArrays, steps: int, batch_size: int, learning_rate: float,
              *, proximal_mu: float = 0.0) -> TrainResult:
        return self.inner.train(base, steps, batch_size, learning_rate,
                                   proximal_mu=proximal_mu)


class Slowed(TrainerWrapper):
    """A simulated slower party (``--slowdown``, ``--slowdown-sigma``; for benchmarks).

    After each round it sleeps (s - 1) times the measured training time: sleeping takes no
    CPU, so on a shared machine the other parties are not slowed by the simulation. With
    ``sigma`` > 0 each round's s is drawn anew, lognormal with median ``slowdown`` and that
    shape (at least 1): heavy-tailed stragglers that change from round to round (per-step
    draws would average out over a round's many steps). Seeded: the same runs repeat.
    """

    def __init__(self, inner: Trainer, slowdown: float, sigma: float = 0.0, seed: int = 0
                 ) -> None:
        super().__init__(inner)
        self.slowdown, self.sigma = slowdown, sigma
        self._delays = np.random.default_rng([seed, 1])

    def train(self, base: NDArrays, steps: int, batch_size: int, learning_rate: float,
              *, proximal_mu: float = 0.0) -> TrainResult:
        result = self.inner.train(base, steps, batch_size, learning_rate,
                                   proximal_mu=proximal_mu)
        if result is None:
            return None
        factor = self.slowdown
        if self.sigma > 0:
            factor = max(1.0, factor * float(np.exp(self.sigma
                                                    * self._delays.standard_normal())))
        spent = result[1]["train_seconds"]
        if factor > 1 and self.interrupted.wait((factor - 1) * spent):
            return None
        return result


def build_trainer(config: WorkerConfig, party_id: int) -> Trainer:
    """The default factory: this party's shard of the data plug-in, a Keras trainer (DP-SGD
    with ``--dp-sgd``), and the simulated slowdown when ``--slowdown`` asks for one."""

    data = load_dataset(config.data, config.data_dir)
    shard = partition_indices(data.y_train, config.num_parties, config.partition,
                              alpha=config.alpha, shards_per_party=config.shards_per_party,
                              seed=config.seed)[party_id]
    log.info("party %d: %d training samples (%s partition)", party_id, len(shard),
             config.partition)
    trainer: Trainer
    if config.dp_sgd:
        from worker.dpsgd import DpSgdTrainer  # imports TensorFlow

        trainer = DpSgdTrainer.from_config(config, party_id, data.x_train[shard],
                                           data.y_train[shard])
    else:
        from worker.training import LocalTrainer  # imports Keras: only where training happens

        trainer = LocalTrainer(config.model, data.x_train[shard], data.y_train[shard],
                               seed=config.seed + party_id)
    if config.slowdown > 1 or config.slowdown_sigma > 0:
        trainer = Slowed(trainer, config.slowdown, config.slowdown_sigma,
                         seed=config.seed + party_id)
    return trainer
