"""Local training: from a global model to a weight delta, on the party's own shard.

Imports Keras: the worker service imports this module only once it is about to train.
Runs on the worker's training thread only (Keras objects never cross to the thread that
services the broker). Each round trains ``steps`` minibatches taken in order from a seeded
permutation of the shard that is reshuffled every pass, so all samples are visited equally
however rounds and epochs line up.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import keras
import numpy as np

from messages.daemon.plugins import build_model
from messages.types import NDArray, NDArrays, Tensors


class _Interrupt(keras.callbacks.Callback):  # type: ignore[misc]
    """Ends ``fit`` after the current batch once ``event`` is set (SIGTERM, stop)."""

    def __init__(self, event: threading.Event) -> None:
        super().__init__()
        self.event = event

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if self.event.is_set():
            self.model.stop_training = True


class LocalTrainer:
    """A party's Keras model and shard; ``train`` turns a global model into a delta."""

    def __init__(self, model_plugin: str, x: NDArray, y: NDArray, seed: int) -> None:
        self.model = build_model(model_plugin, seed)
        self.names = [w.path for w in self.model.weights]
        self.x, self.y = x, y
        self.interrupted = threading.Event()
        self._interrupt = _Interrupt(self.interrupted)
        self._rng = np.random.default_rng(seed)
        self._order = self._rng.permutation(len(y))
        self._pos = 0

    def initial(self) -> Tensors:
        """The freshly initialised weights, by name (sent with the join)."""
        return dict(zip(self.names, self.model.get_weights(), strict=True))

    def _next_indices(self, count: int) -> NDArray:
        parts = []
        while count > 0:
            if self._pos == len(self._order):
                self._order, self._pos = self._rng.permutation(len(self.y)), 0
            take = min(count, len(self._order) - self._pos)
            parts.append(self._order[self._pos:self._pos + take])
            self._pos += take
            count -= take
        return np.concatenate(parts)

    def train(self, base: NDArrays, steps: int, batch_size: int, learning_rate: float
              ) -> tuple[NDArrays, dict[str, float]] | None:
        """Train ``steps`` minibatches from ``base``; the delta and local metrics.

        Returns None when interrupted (the partial work is dropped: a delta must cover the
        whole round it claims). A simulated slower party is a wrapper
        (``worker.trainers.Slowed``), not part of this trainer.
        """
        started = time.perf_counter()
        self.model.set_weights(base)
        self.model.optimizer.learning_rate.assign(learning_rate)
        idx = self._next_indices(steps * batch_size)
        history = self.model.fit(self.x[idx], self.y[idx], batch_size=batch_size, epochs=1,
                                 shuffle=False, verbose=0, callbacks=[self._interrupt])
        if self.interrupted.is_set():
            return None
        delta = [np.subtract(new, old, dtype=np.float32)
                 for new, old in zip(self.model.get_weights(), base, strict=True)]
        spent = time.perf_counter() - started
        metrics = {k: float(v[-1]) for k, v in history.history.items()}
        metrics["train_seconds"] = spent
        return delta, metrics
