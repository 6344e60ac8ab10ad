"""FedProx: the proximal term in local training, and the setting that sends it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aggregator import AggregatorConfig
from messages.errors import ConfigError
from worker.data import load_synthetic


def norm(delta: list[np.ndarray]) -> float:
    return math.sqrt(sum(float(np.dot(d.ravel(), d.ravel())) for d in delta))


def test_the_proximal_term_is_mu_half_the_squared_distance_to_the_round_s_base() -> None:
    from worker.training import LocalTrainer, _Proximal

    data = load_synthetic(num_train=64, num_test=8)
    trainer = LocalTrainer("worker.models:tiny_cnn", data.x_train, data.y_train, seed=0)
    model = trainer.model
    prox = _Proximal(model)
    prox.set(2.0)  # anchored at the current weights
    shift = 0.1
    for w in model.trainable_weights:
        w.assign(w + shift)
    y_pred = model(data.x_train[:8], training=False)
    plain = float(model.compute_loss(y=data.y_train[:8], y_pred=y_pred, training=False))
    with_term = float(model.compute_loss(y=data.y_train[:8], y_pred=y_pred, training=True))
    size = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert with_term - plain == pytest.approx(0.5 * 2.0 * shift**2 * size, rel=1e-4)


@pytest.mark.slow
def test_a_large_mu_keeps_local_training_near_the_base_and_mu_0_changes_nothing() -> None:
    from worker.training import LocalTrainer

    data = load_synthetic(num_train=512, num_test=8)

    def delta(mu: float | None) -> list[np.ndarray]:
        trainer = LocalTrainer("worker.models:tiny_cnn", data.x_train, data.y_train, seed=0)
        base = trainer.model.get_weights()
        result = (trainer.train(base, 20, 16, 1e-2) if mu is None
                  else trainer.train(base, 20, 16, 1e-2, proximal_mu=mu))
        assert result is not None
        return result[0]

    free, off, pulled = delta(None), delta(0.0), delta(50.0)
    for a, b in zip(free, off, strict=True):
        np.testing.assert_array_equal(a, b)  # mu 0 is the plain trainer, bit for bit
    assert norm(pulled) < 0.5 * norm(free)


def test_mu_reaches_parties_in_the_welcome_only_when_set() -> None:
    base = {"broker": "memory://x", "evaluate": False}
    assert "proximal_mu" not in AggregatorConfig(**base).settings()
    assert AggregatorConfig(**base, proximal_mu=0.01).settings()["proximal_mu"] == 0.01
    with pytest.raises(ConfigError, match="--proximal-mu") as err:
        AggregatorConfig(**base, proximal_mu=-1)
    assert "\n" not in str(err.value)
