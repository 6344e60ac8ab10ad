"""Evaluation of global model snapshots on a held-out set, beside the aggregation loop.

Keras work happens on this module's own thread, never on the thread that services the
broker, and TensorFlow is imported only when the first snapshot is evaluated: an aggregator
without evaluation stays numpy-only and starts fast. The evaluation log is JSONL, one line
per evaluated version: ``time`` (seconds since start), ``version``, ``accuracy``, ``loss``,
``updates`` (updates applied so far).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np

from messages.daemon.plugins import build_model, check_data_plugin, load_dataset
from messages.errors import FederationError
from messages.types import NDArrays, Tensors

log = logging.getLogger(__name__)

EvalRecord = dict[str, Any]


def load_keras_weights(path: str, model_plugin: str) -> Tensors:
    """A saved ``.keras`` model's weights, named as the model plug-in names them.

    Keras names a reloaded model's weights differently from a freshly built one (no model
    prefix), so the names come from the plug-in and the file supplies the values, checked
    shape by shape. Imports Keras: only when a starting model is given.
    """
    import keras

    try:
        saved = keras.saving.load_model(path, compile=False)
    except Exception as exc:
        raise FederationError(f"--initial-model {path!r}: cannot load it ({exc})") from None
    fresh = build_model(model_plugin, 0)
    names = [w.path for w in fresh.weights]
    values = [np.asarray(v) for v in saved.get_weights()]
    shapes = [tuple(w.shape) for w in fresh.weights]
    if [v.shape for v in values] != shapes:
        raise FederationError(f"--initial-model {path!r} does not fit --model {model_plugin}")
    return dict(zip(names, values, strict=True))


class Evaluator:
    """Evaluates the newest submitted snapshot; older pending snapshots are skipped."""

    def __init__(self, model_plugin: str, data_plugin: str, data_dir: str | None, seed: int,
                 log_path: str | None, tensorboard: str | None = None) -> None:
        check_data_plugin(data_plugin)  # a wrong signature stops the aggregator at start
        self._model_plugin, self._data_plugin = model_plugin, data_plugin
        self._data_dir, self._seed = data_dir, seed
        self._log_path = Path(log_path) if log_path else None
        self._tensorboard = tensorboard
        self._pending: tuple[int, NDArrays, int, float] | None = None
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self.results: queue.Queue[EvalRecord] = queue.Queue()
        self.history: list[EvalRecord] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="evaluator", daemon=True)

    def start(self, *, resumed: bool = False) -> None:
        """Start the thread; a fresh run empties the log, a resumed one appends to it."""
        if self._log_path is not None:
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            if not resumed:
                self._log_path.write_text("")
        self._thread.start()

    def submit(self, version: int, weights: NDArrays, updates: int, elapsed: float) -> None:
        """Queue a snapshot (the caller passes copies: the evaluator keeps them)."""
        with self._cond:
            self._pending = (version, weights, updates, elapsed)
            self._cond.notify_all()

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._busy and self._pending is None

    def wait_idle(self, timeout: float) -> bool:
        """Block until every submitted snapshot is evaluated (or ``timeout``)."""
        with self._cond:
            return self._cond.wait_for(
                lambda: (not self._busy and self._pending is None) or self._closed
                or self.error is not None, timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            model = build_model(self._model_plugin, self._seed)
            data = load_dataset(self._data_plugin, self._data_dir)
            scalars = _TensorBoard(self._tensorboard) if self._tensorboard else None
        except BaseException as exc:  # reported to the aggregator, which stops with it
            with self._cond:
                self.error = exc
                self._cond.notify_all()
            return
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                version, weights, updates, elapsed = self._pending
                self._pending, self._busy = None, True
            try:
                model.set_weights(weights)
                scores = model.evaluate(data.x_test, data.y_test, batch_size=500, verbose=0,
                                        return_dict=True)
                record: EvalRecord = {"time": round(elapsed, 3), "version": version,
                                      "accuracy": float(scores["accuracy"]),
                                      "loss": float(scores["loss"]), "updates": updates}
                self.history.append(record)
                if self._log_path is not None:
                    with self._log_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                if scalars is not None:
                    scalars.write(record)
                self.results.put(record)
            except BaseException as exc:
                with self._cond:
                    self.error = exc
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


class _TensorBoard:
    """Evaluation scalars for TensorBoard: by version, and by whole seconds of wall time."""

    def __init__(self, logdir: str) -> None:
        import tensorflow as tf

        self._tf = tf
        self._writer = tf.summary.create_file_writer(logdir)

    def write(self, record: EvalRecord) -> None:
        tf = self._tf
        with self._writer.as_default():
            for name in ("accuracy", "loss"):
                tf.summary.scalar(f"{name}/by_version", record[name], step=record["version"])
                tf.summary.scalar(f"{name}/by_seconds", record[name], step=int(record["time"]))
        self._writer.flush()
