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


class _Proximal:
    """FedProx's proximal term (Li et al. 2020): ``mu/2 * ||w - w_base||^2`` added to the
    model's training loss, so local training is pulled towards the model it started from.

    The model's ``compute_loss`` is wrapped on this instance (every Keras model and loss
    keeps working) and its train function rebuilt once; ``mu`` and the anchor weights are
    variables, assigned each round, so the traced function is not traced again. Evaluation
    (``training=False``) sees the plain loss.
    """

    def __init__(self, model: keras.Model) -> None:
        self.model = model
        self.mu = keras.Variable(0.0, trainable=False, name="proximal_mu")
        self.anchor = [keras.Variable(np.zeros(w.shape), trainable=False, dtype=w.dtype,
                                      name=f"anchor_{i}")
                       for i, w in enumerate(model.trainable_weights)]
        plain = model.compute_loss

        def compute_loss(x: Any = None, y: Any = None, y_pred: Any = None,
                         sample_weight: Any = None, training: bool = True) -> Any:
            loss = plain(x, y, y_pred, sample_weight, training=training)
            if not training:
                return loss
            drift = [keras.ops.sum(keras.ops.square(w - a))
                     for w, a in zip(model.trainable_weights, self.anchor, strict=True)]
            return loss + 0.5 * self.mu * keras.ops.sum(keras.ops.stack(drift))

        model.compute_loss = compute_loss
        model.train_function = None  # traced again, once, with the term

    def set(self, mu: float) -> None:
        """This round: the anchor is the model's current (base) weights."""
        self.mu.assign(mu)
        for a, w in zip(self.anchor, self.model.trainable_weights, strict=True):
            a.assign(w)


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
        self._proximal: _Proximal | None = None  # made when a round first asks for mu > 0

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

    def train(self, base: NDArrays, steps: int, batch_size: int, learning_rate: float,
              *, proximal_mu: float = 0.0) -> tuple[NDArrays, dict[str, float]] | None:
        """Train ``steps`` minibatches from ``base``; the delta and local metrics.

        Returns None when interrupted (the partial work is dropped: a delta must cover the
        whole round it claims). ``proximal_mu`` > 0 adds FedProx's ``mu/2 * ||w - base||^2``
        to the training loss (``_Proximal``). A simulated slower party is a wrapper
        (``worker.trainers.Slowed``), not part of this trainer.
        """
        started = time.perf_counter()
        self.model.set_weights(base)
        self.model.optimizer.learning_rate.assign(learning_rate)
        if proximal_mu > 0 and self._proximal is None:
            self._proximal = _Proximal(self.model)
        if self._proximal is not None:
            self._proximal.set(proximal_mu)
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
