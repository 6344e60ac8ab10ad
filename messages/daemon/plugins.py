"""Loading model and data plug-ins given as ``package.module:function``.

Both daemons take their Keras model and their dataset as import paths so users can plug in
their own without touching the framework; this is the one place that resolves them.

The contract, checked from the function's signature (``inspect.signature``) when a daemon is
constructed, before it connects or trains:

* A **data** plug-in (``--data``) is called with no arguments, except that it gets the data
  folder (``--data-dir`` / ``DFL_DATA_DIR``) as ``data_dir=DIR``, *by keyword*, when one is
  set and the function declares a ``data_dir`` parameter (or takes ``**kwargs``). A function
  without ``data_dir`` never sees the folder, so ``DFL_DATA_DIR`` exported for MNIST cannot
  land in another loader's first parameter. Every parameter needs a default::

      def load(data_dir: str | None = None) -> Dataset: ...

  It returns an object with ``x_train, y_train, x_test, y_test`` arrays (the built-ins
  ``worker.data:load_mnist`` and ``load_synthetic`` return ``worker.data.Dataset``).
* A **model** plug-in (``--model``) is called with no arguments and returns a compiled
  ``keras.Model``; every parameter it has needs a default.

A function whose signature breaks the contract is refused with a one-line ``PluginError``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from messages.errors import PluginError

DATA_DIR = "data_dir"


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


def _check_signature(option: str, path: str, function: Callable[..., Any],
                     fix: str) -> bool:
    """Whether ``function`` takes ``data_dir`` by keyword; ``PluginError`` when it has a
    parameter without a default (it is called with no arguments besides ``data_dir``)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin without a signature: trust it
        return False
    takes_dir = False
    for param in signature.parameters.values():
        if param.kind is param.VAR_KEYWORD:
            takes_dir = True
        elif param.kind is not param.VAR_POSITIONAL:
            keyword = param.kind is not param.POSITIONAL_ONLY
            if param.name == DATA_DIR and keyword:
                takes_dir = True
            if param.default is param.empty:
                raise PluginError(f"{option} {path}: parameter {param.name!r} has no default, "
                                  f"but {fix}")
    return takes_dir


def check_data_plugin(data_plugin: str) -> tuple[Callable[..., Any], bool]:
    """The data plug-in's loader, and whether it takes ``data_dir`` (see the module doc).

    Raises ``PluginError`` (one line) when it cannot be loaded or its signature cannot be met.
    """
    loader = load_plugin(data_plugin)
    name = data_plugin.rpartition(":")[2].rpartition(".")[2]
    takes_dir = _check_signature(
        "--data", data_plugin, loader,
        "a data plug-in is called with no arguments, plus data_dir=DIR by keyword when it "
        f"declares data_dir: declare `def {name}(data_dir=None, ...)` with defaults for the "
        "rest")
    return loader, takes_dir


def check_model_plugin(model_plugin: str) -> Callable[..., Any]:
    """The model plug-in's builder; ``PluginError`` (one line) when it cannot be called
    without arguments."""
    builder = load_plugin(model_plugin)
    name = model_plugin.rpartition(":")[2].rpartition(".")[2]
    _check_signature("--model", model_plugin, builder,
                     f"a model plug-in is called with no arguments: declare `def {name}()` "
                     "returning a compiled keras.Model")
    return builder


def load_dataset(data_plugin: str, data_dir: str | None = None) -> Any:
    """Call a data plug-in: with ``data_dir=`` (by keyword) when one was given and the loader
    declares it, else with no arguments."""
    loader, takes_dir = check_data_plugin(data_plugin)
    return loader(data_dir=data_dir) if data_dir and takes_dir else loader()


def build_model(model_plugin: str, seed: int, weights: list[Any] | None = None) -> Any:
    """A compiled Keras model from its plug-in, seeded first, with ``weights`` set if given.

    Imports Keras, so call it only where training or evaluation happens.
    """
    import keras

    builder = check_model_plugin(model_plugin)
    keras.utils.set_random_seed(seed)
    model = builder()
    if weights is not None:
        model.set_weights(weights)
    return model
