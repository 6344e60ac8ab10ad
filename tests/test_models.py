"""The built-in models have the promised size, stable weight names, and actually learn."""

from __future__ import annotations

from collections.abc import Callable

import keras
import pytest

from worker.data import load_synthetic
from worker.models import dp_cnn, mnist_cnn, mnist_mlp, tiny_cnn

MODELS: list[Callable[[], keras.Model]] = [mnist_cnn, mnist_mlp, tiny_cnn]
ALL_MODELS = [*MODELS, dp_cnn]


def test_mnist_cnn_has_the_keras_example_parameter_count() -> None:
    assert mnist_cnn().count_params() == 1_199_882


def test_dp_cnn_is_the_tensorflow_privacy_tutorial_cnn_with_logits() -> None:
    model = dp_cnn()
    assert model.count_params() == 26_010
    assert [type(layer).__name__ for layer in model.layers] == [
        "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Flatten", "Dense", "Dense"]
    assert model.output_shape == (None, 10)
    assert model.loss.get_config()["from_logits"] is True
    assert type(model.optimizer).__name__ == "SGD"


@pytest.mark.parametrize("build", ALL_MODELS, ids=lambda build: build.__name__)
def test_weight_paths_are_unique_and_identical_across_builds(
        build: Callable[[], keras.Model]) -> None:
    first = [w.path for w in build().weights]
    second = [w.path for w in build().weights]
    assert len(set(first)) == len(first)
    assert first == second


@pytest.mark.parametrize("build", MODELS, ids=lambda build: build.__name__)
def test_models_come_back_compiled_for_integer_labels(build: Callable[[], keras.Model]) -> None:
    model = build()
    assert model.compiled
    assert model.loss == "sparse_categorical_crossentropy"
    assert model.output_shape == (None, 10)


@pytest.mark.slow
def test_tiny_cnn_learns_synthetic_data_well_above_chance_in_one_epoch() -> None:
    keras.utils.set_random_seed(0)
    data = load_synthetic(num_train=512, num_test=200)
    model = tiny_cnn()
    model.fit(data.x_train, data.y_train, epochs=1, batch_size=32, verbose=0)
    _, accuracy = model.evaluate(data.x_test, data.y_test, verbose=0)
    assert accuracy > 0.3
