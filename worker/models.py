"""Built-in Keras model plug-ins for MNIST-shaped input (28x28x1, ten classes).

A model plug-in is a zero-argument function returning a *compiled* ``keras.Model``; parties
and the aggregator each call it to build the same architecture. Weights travel by name
(``w.path`` for ``w`` in ``model.weights``), so every layer here has an explicit ``name=``:
Keras's automatic names carry a per-process counter (``dense_3``) that would differ between
processes, or after building a second model in one process.

None of these functions seeds anything; call ``keras.utils.set_random_seed`` first when the
initial weights must be reproducible. Output is softmax probabilities, matching the
``sparse_categorical_crossentropy`` loss on integer labels, except for ``dp_cnn`` (logits,
with the loss ``from_logits``, as in the DP-SGD literature it comes from).
"""

from __future__ import annotations

import keras

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
LEARNING_RATE = 1e-3


def mnist_cnn() -> keras.Model:
    """The classic Keras MNIST example CNN: 1,199,882 parameters, ~99% test accuracy."""
    return _compiled("mnist_cnn", [
        keras.layers.Conv2D(32, 3, activation="relu", name="conv1"),
        keras.layers.Conv2D(64, 3, activation="relu", name="conv2"),
        keras.layers.MaxPooling2D(2, name="pool"),
        keras.layers.Dropout(0.25, name="dropout1"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(128, activation="relu", name="dense1"),
        keras.layers.Dropout(0.5, name="dropout2"),
        keras.layers.Dense(NUM_CLASSES, activation="softmax", name="output"),
    ])


def mnist_mlp() -> keras.Model:
    """A one-hidden-layer perceptron (~100k parameters): fast, ~97% test accuracy."""
    return _compiled("mnist_mlp", [
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(128, activation="relu", name="dense1"),
        keras.layers.Dense(NUM_CLASSES, activation="softmax", name="output"),
    ])


def tiny_cnn() -> keras.Model:
    """A ~6,800-parameter CNN for tests and smoke runs: trains in seconds on a CPU."""
    return _compiled("tiny_cnn", [
        keras.layers.Conv2D(4, 3, strides=2, activation="relu", name="conv1"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(NUM_CLASSES, activation="softmax", name="output"),
    ])


def dp_cnn() -> keras.Model:
    """The TensorFlow Privacy MNIST tutorial's CNN for DP-SGD (``--dp-sgd``): 26,010 parameters.

    Small on purpose: DP-SGD computes one gradient per example, and the noise added to each
    step grows with the number of coordinates. Trained with plain SGD (the tutorial's
    optimizer; the learning rate comes from the aggregator's ``--learning-rate``, the
    tutorial used 0.15 with batches of 250).
    """
    model = keras.Sequential([
        keras.Input(shape=INPUT_SHAPE, name="image"),
        keras.layers.Conv2D(16, 8, strides=2, padding="same", activation="relu", name="conv1"),
        keras.layers.MaxPooling2D(2, 1, name="pool1"),
        keras.layers.Conv2D(32, 4, strides=2, padding="valid", activation="relu", name="conv2"),
        keras.layers.MaxPooling2D(2, 1, name="pool2"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(32, activation="relu", name="dense1"),
        keras.layers.Dense(NUM_CLASSES, name="logits"),
    ], name="dp_cnn")
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.15),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def _compiled(name: str, layers: list[keras.layers.Layer]) -> keras.Model:
    """Stack ``layers`` on the MNIST input and compile with the project's shared settings.

    Every built-in model uses the same optimizer, loss and metric so that results differ only
    by architecture; the optimizer state stays local to each party and is never sent.
    """
    model = keras.Sequential([keras.Input(shape=INPUT_SHAPE, name="image"), *layers], name=name)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=LEARNING_RATE),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model
