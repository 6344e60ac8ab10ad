"""Type aliases shared by every package (one place, so signatures read the same everywhere)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

NDArray = npt.NDArray[Any]
"""Any numpy array (weights, deltas, data)."""

NDArrays = list[NDArray]
"""Model weights or a delta, in the model's own order."""

Tensors = dict[str, NDArray]
"""Named tensors as they travel on the wire; dict order is the model's order."""

Scalar = bool | int | float | str
Settings = dict[str, Scalar]
"""Training settings the aggregator hands to parties in its welcome."""

Headers = dict[str, Any]
"""An AMQP header table as a client decodes it (any value types: check before use)."""

Document = dict[str, Any]
"""Plain data (maps, lists, strings, numbers) such as a status report."""

TensorSpec = tuple[tuple[str, str, tuple[int, ...]], ...]
"""(name, dtype, shape) for every tensor of a model: what an update must match."""


def spec_of(tensors: Tensors) -> TensorSpec:
    """The names, dtypes and shapes of ``tensors``, hashable and comparable."""
    return tuple((name, np.dtype(a.dtype).name, tuple(int(d) for d in a.shape))
                 for name, a in tensors.items())
