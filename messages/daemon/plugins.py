"""Loading model and data plug-ins given as ``package.module:function``.

Both daemons take their Keras model and their dataset as import paths so users can plug in
their own without touching the framework; this is the one place that resolves them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from messages.errors import PluginError


def load_plugin(path: str) -> Callable[..., Any]:
    """Import ``package.module:function`` and return the callable.

    Raises ``PluginError`` with a one-line explanation when the path is malformed, the module
    cannot be imported, or the attribute is missing or not callable.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise PluginError(f"plug-in {path!r}: write it as package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginError(f"plug-in {path!r}: cannot import {module_name!r} ({exc})") from None
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise PluginError(f"plug-in {path!r}: {module_name!r} has no {attr!r}")
    if not callable(obj):
        raise PluginError(f"plug-in {path!r}: {attr!r} is not callable")
    function: Callable[..., Any] = obj
    return function


def load_dataset(data_plugin: str, data_dir: str | None = None) -> Any:
    """Call a data plug-in: with ``data_dir`` when one was given, else with no arguments.

    A data plug-in returns an object with ``x_train, y_train, x_test, y_test`` arrays (the
    built-in ``worker.data:load_mnist`` returns ``worker.data.Dataset``).
    """
    loader = load_plugin(data_plugin)
    return loader(data_dir) if data_dir else loader()


def build_model(model_plugin: str, seed: int, weights: list[Any] | None = None) -> Any:
    """A compiled Keras model from its plug-in, seeded first, with ``weights`` set if given.

    Imports Keras, so call it only where training or evaluation happens.
    """
    import keras

    keras.utils.set_random_seed(seed)
    model = load_plugin(model_plugin)()
    if weights is not None:
        model.set_weights(weights)
    return model
