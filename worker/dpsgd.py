"""DP-SGD inside a party: Poisson-sampled batches, per-example clipping, Gaussian noise.

Record-level differential privacy for any Keras 3 model on the TensorFlow backend
(TensorFlow Privacy does not install with TensorFlow 2.16+ and Keras 3, so the step is
written here). One step (Abadi et al. 2016, with Poisson sampling as the accountant
assumes):

1. each record of the shard joins the batch independently with probability
   ``q = batch_size / n`` (so the batch size varies from step to step);
2. the gradient of each record's loss is computed separately (``tf.vectorized_map`` over
   the batch) and scaled to L2 norm at most ``C``, the norm taken over all trainable
   variables together;
3. the clipped gradients are summed, ``N(0, (z * C)^2)`` noise is added to every
   coordinate, and the sum is divided by the *expected* batch size ``q * n`` (dividing by
   the actual size would make the step's sensitivity depend on it);
4. the model's own optimizer applies that gradient (any optimizer is post-processing).

``worker.accounting`` counts the steps and turns them into epsilon. Both the sampling and
the noise come from fresh operating-system entropy unless a ``secret_seed`` is given (tests
only): a batch or a noise draw anyone could regenerate from the federation's ``--seed``
protects nothing. The model must not use batch statistics while training
(``BatchNormalization``), which would mix records before clipping; the model's own
regularisation losses (``model.losses``) are not used.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from messages.daemon.plugins import build_model
from messages.errors import ConfigError, FederationError
from messages.types import NDArray, NDArrays, Tensors
from worker.accounting import StepLedger, StepSetting
from worker.trainers import StopTraining

if TYPE_CHECKING:
    from worker.config import WorkerConfig

log = logging.getLogger("dfl.worker")
LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
_TRACING = threading.Lock()  # one trace at a time: it swaps a converter of TF's pfor


def per_example_loss(model: keras.Model) -> LossFn:
    """The compiled model's loss, unreduced: one value per example of a batch.

    Raises ``ConfigError`` when the model was compiled without one loss (several outputs,
    or no ``compile``).
    """
    loss = keras.losses.get(model.loss) if isinstance(model.loss, str) else model.loss
    if isinstance(loss, keras.losses.Loss):
        call: LossFn = loss.call  # ``__call__`` would reduce over the batch
        return call
    if callable(loss):
        return loss  # type: ignore[no-any-return]
    raise ConfigError(f"--dp-sgd needs a model compiled with one loss function, got "
                      f"{model.loss!r}; compile the model plug-in with loss=...")


@contextlib.contextmanager
def _batched_conv_filter_gradients() -> Iterator[None]:
    """While tracing, vectorise the per-example gradients of ``Conv2D`` kernels.

    TensorFlow's ``vectorized_map`` converts ``Conv2DBackpropFilter`` with a per-example
    input into a ``while_loop`` over the examples (its source says "TODO: implement this
    efficiently"). Here it becomes one im2col product: the input's patches
    (``tf.image.extract_patches``) times the output's gradient, summed over positions, per
    example; twice the throughput on the DP-SGD CNN (2 cores). It touches TensorFlow's
    private converter registry only for the duration of one trace; anything it does not
    handle (NCHW, explicit padding, a registry that moved) keeps TensorFlow's converter.
    """
    try:
        from tensorflow.python.ops.parallel_for import pfor
        registry: dict[str, Any] = pfor._pfor_converter_registry
        stock = registry["Conv2DBackpropFilter"]
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def convert(pfor_input: Any) -> Any:
        inputs, stacked, _ = pfor_input.input(0)
        sizes = tf.get_static_value(pfor_input.unstacked_input(1))
        padding = pfor_input.get_attr("padding")
        padding = padding.decode() if isinstance(padding, bytes) else padding
        data_format = pfor_input.get_attr("data_format")
        if (not stacked or sizes is None or padding not in ("SAME", "VALID")
                or data_format not in (b"NHWC", "NHWC")):
            return stock(pfor_input)
        pfor_input.stack_inputs(stack_indices=[2])
        grads = pfor_input.stacked_input(2)  # [n, b, H', W', out]
        kh, kw, cin, cout = (int(s) for s in sizes)
        shape = tf.shape(inputs)  # [n, b, H, W, in]: b examples in each of n iterations
        patches = tf.image.extract_patches(
            tf.reshape(inputs, tf.concat([[-1], shape[2:]], 0)), sizes=[1, kh, kw, 1],
            strides=list(pfor_input.get_attr("strides")),
            rates=list(pfor_input.get_attr("dilations")), padding=padding)
        patches = tf.reshape(patches, [shape[0], -1, kh * kw * cin])
        grads = tf.reshape(grads, [shape[0], -1, cout])
        out = tf.einsum("npk,npc->nkc", patches, grads)
        return pfor.wrap(tf.reshape(out, [shape[0], kh, kw, cin, cout]), True)

    registry["Conv2DBackpropFilter"] = convert
    try:
        yield
    finally:
        registry["Conv2DBackpropFilter"] = stock


class DpSgdStep:
    """One model's DP-SGD step, traced once for batches of any size.

    ``clipped_sum(x, y)`` is the sum of the per-example gradients clipped to ``l2_clip``
    (tests); ``noised(x, y, expected)`` adds the noise and divides by ``expected`` (the
    gradient a step applies); calling the step applies that with the model's optimizer.
    """

    def __init__(self, model: keras.Model, l2_clip: float, noise_multiplier: float,
                 x: NDArray, y: NDArray, secret_seed: int | None = None) -> None:
        """``x`` and ``y``: the shard (or any batch), for the examples' shapes and dtypes."""
        self.model = model
        self.l2_clip = float(l2_clip)
        self.noise_multiplier = float(noise_multiplier)
        self._loss = per_example_loss(model)
        self._variables = list(model.trainable_variables)
        model.optimizer.build(self._variables)
        self._noise = (tf.random.Generator.from_non_deterministic_state() if secret_seed is None
                       else tf.random.Generator.from_seed(secret_seed))
        self._dtypes = x.dtype, y.dtype
        x_spec = tf.TensorSpec([None, *x.shape[1:]], tf.as_dtype(x.dtype))
        y_spec = tf.TensorSpec([None, *y.shape[1:]], tf.as_dtype(y.dtype))
        scalar = tf.TensorSpec([], tf.float32)
        self._clipped = self._traced(self._clipped_sum, x_spec, y_spec)
        self._noised = self._traced(self._noised_mean, x_spec, y_spec, scalar)
        self._apply = self._traced(self._apply_step, x_spec, y_spec, scalar)

    @staticmethod
    def _traced(fn: Callable[..., Any], *signature: tf.TensorSpec) -> Callable[..., Any]:
        """``fn`` as a graph for batches of any size, traced on its first call (once)."""
        graph = tf.function(fn, input_signature=list(signature))
        concrete: list[Callable[..., Any]] = []

        def call(*args: Any) -> Any:
            if not concrete:
                with _TRACING, _batched_conv_filter_gradients():
                    concrete.append(graph.get_concrete_function())
            return concrete[0](*args)

        return call

    def clipped_sum(self, x: NDArray, y: NDArray) -> NDArrays:
        """The sum over the batch of each example's gradient clipped to ``l2_clip``."""
        return [g.numpy() for g in self._clipped(*self._batch(x, y))]

    def noised(self, x: NDArray, y: NDArray, expected: float) -> NDArrays:
        """``(clipped_sum + N(0, (z C)^2)) / expected``: the gradient a step applies."""
        return [g.numpy() for g in self._noised(*self._batch(x, y), np.float32(expected))]

    def __call__(self, x: NDArray, y: NDArray, expected: float) -> None:
        """One step on this batch (``expected``: the expected batch size ``q * n``)."""
        self._apply(*self._batch(x, y), np.float32(expected))

    def _batch(self, x: NDArray, y: NDArray) -> tuple[NDArray, NDArray]:
        return np.asarray(x, self._dtypes[0]), np.asarray(y, self._dtypes[1])

    def _clipped_sum(self, x: tf.Tensor, y: tf.Tensor) -> list[tf.Tensor]:
        if not self._variables:
            return []

        def one(example: tuple[tf.Tensor, tf.Tensor]) -> list[tf.Tensor]:
            xi, yi = example
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(self._loss(yi[None], self.model(xi[None], training=True)))
            grads = tape.gradient(loss, [v.value for v in self._variables])
            return [tf.zeros_like(v.value) if g is None else g
                    for g, v in zip(grads, self._variables, strict=True)]

        def clipped() -> list[tf.Tensor]:
            per_example = tf.vectorized_map(one, (x, y))  # each [batch, *variable shape]
            squares = [tf.reduce_sum(tf.reshape(tf.square(g), [tf.shape(g)[0], -1]), axis=1)
                       for g in per_example]
            norms = tf.sqrt(tf.add_n(squares))
            scale = tf.minimum(1.0, self.l2_clip / tf.maximum(norms, 1e-12))
            return [tf.tensordot(scale, g, axes=1) for g in per_example]

        # Poisson sampling can draw an empty batch: the step is then noise alone
        return tf.cond(tf.shape(x)[0] > 0, clipped,  # type: ignore[no-any-return]
                       lambda: [tf.zeros_like(v.value) for v in self._variables])

    def _noised_mean(self, x: tf.Tensor, y: tf.Tensor, expected: tf.Tensor
                     ) -> list[tf.Tensor]:
        std = self.noise_multiplier * self.l2_clip
        return [(s + self._noise.normal(tf.shape(s), stddev=std)) / expected
                for s in self._clipped_sum(x, y)]

    def _apply_step(self, x: tf.Tensor, y: tf.Tensor, expected: tf.Tensor) -> None:
        self.model.optimizer.apply(self._noised_mean(x, y, expected), self._variables)


class DpSgdTrainer:
    """A ``Trainer`` (``worker.trainers``) whose rounds are DP-SGD steps, with a ledger.

    Each round of ``steps`` checks the budget first: when ``target_epsilon`` is set and the
    round would take epsilon past it, ``train`` raises ``StopTraining`` and runs nothing.
    Otherwise the round's steps are recorded in the ledger before the first one runs (a
    stop part-way gives back the steps that did not run). The metrics sent with the delta
    are ``epsilon`` (at ``delta``, all steps so far), ``dp_steps`` and ``train_seconds``:
    no loss or accuracy on the records, which would be a release the accountant does not
    cover.
    """

    def __init__(self, model_plugin: str, x: NDArray, y: NDArray, *, seed: int,
                 noise_multiplier: float, l2_clip: float, delta: float,
                 state_dir: str | Path, target_epsilon: float | None = None,
                 secret_seed: int | None = None) -> None:
        self.model = build_model(model_plugin, seed)
        self.names = [w.path for w in self.model.weights]
        self.x, self.y = x, y
        self.interrupted = threading.Event()
        self.delta, self.target_epsilon = delta, target_epsilon
        self.noise_multiplier, self.l2_clip = float(noise_multiplier), float(l2_clip)
        self.step = DpSgdStep(self.model, l2_clip, noise_multiplier, x, y, secret_seed)
        self.ledger = StepLedger(state_dir)
        self._sampler = np.random.default_rng(secret_seed)
        self.party = "?"  # for the log; ``from_config`` sets it

    @classmethod
    def from_config(cls, config: WorkerConfig, party_id: int, x: NDArray, y: NDArray
                    ) -> DpSgdTrainer:
        """The trainer ``--dp-sgd`` asks for; its ledger in ``--state-dir``/party-ID."""
        assert config.noise_multiplier is not None and config.l2_clip is not None
        trainer = cls(config.model, x, y, seed=config.seed + party_id,
                      noise_multiplier=config.noise_multiplier, l2_clip=config.l2_clip,
                      delta=config.dp_delta, state_dir=Path(config.state_dir) / f"party-{party_id}",
                      target_epsilon=config.target_epsilon)
        trainer.party = str(party_id)
        log.info("party %d: DP-SGD (noise multiplier %g, clip %g); ledger %s: %d steps so "
                 "far, epsilon %.4g at delta %g", party_id, config.noise_multiplier,
                 config.l2_clip, trainer.ledger.path, trainer.ledger.steps,
                 trainer.ledger.epsilon(config.dp_delta), config.dp_delta)
        return trainer

    def initial(self) -> Tensors:
        """The freshly initialised weights, by name (sent with the join)."""
        return dict(zip(self.names, self.model.get_weights(), strict=True))

    def setting(self, batch_size: int) -> StepSetting:
        """What one step is with this expected batch size: ``q = batch_size / n``."""
        return StepSetting(self.noise_multiplier, min(1.0, batch_size / len(self.y)),
                           self.l2_clip)

    def train(self, base: NDArrays, steps: int, batch_size: int, learning_rate: float,
              *, proximal_mu: float = 0.0) -> tuple[NDArrays, dict[str, float]] | None:
        """``steps`` DP-SGD steps from ``base``: the delta and its metrics, ``None`` when
        interrupted, ``StopTraining`` when the round would exceed ``target_epsilon``."""
        if proximal_mu > 0:  # never train without a term the federation asked for
            raise FederationError("--dp-sgd does not add FedProx's proximal term: run this "
                                  "federation without --proximal-mu, or this party without "
                                  "--dp-sgd")
        setting = self.setting(batch_size)
        if self.target_epsilon is not None:
            after = self.ledger.epsilon(self.delta, setting, steps)
            if after > self.target_epsilon:
                raise StopTraining(
                    f"privacy budget spent: epsilon {self.ledger.epsilon(self.delta):.4g} "
                    f"after {self.ledger.steps} DP-SGD steps, another {steps} would reach "
                    f"{after:.4g} > --target-epsilon {self.target_epsilon:g}")
        started = time.perf_counter()
        self.model.set_weights(base)
        self.model.optimizer.learning_rate.assign(learning_rate)
        self.ledger.record(setting, steps)  # before they run: a crash cannot forget them
        n, expected = len(self.y), setting.sampling_rate * len(self.y)
        ran = 0
        while ran < steps and not self.interrupted.is_set():
            batch = np.flatnonzero(self._sampler.random(n) < setting.sampling_rate)
            self.step(self.x[batch], self.y[batch], expected)
            ran += 1
        if ran < steps:
            self.ledger.record(setting, ran - steps)  # steps never run spend nothing
            return None
        delta = [np.subtract(new, old, dtype=np.float32)
                 for new, old in zip(self.model.get_weights(), base, strict=True)]
        epsilon = self.ledger.epsilon(self.delta)
        log.info("party %s: DP-SGD round of %d steps (q %.4g): epsilon %.4g at delta %g after "
                 "%d steps", self.party, steps, setting.sampling_rate, epsilon, self.delta,
                 self.ledger.steps)
        return delta, {"epsilon": epsilon, "dp_steps": float(self.ledger.steps),
                       "train_seconds": time.perf_counter() - started}
