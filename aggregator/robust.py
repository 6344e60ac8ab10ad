"""Byzantine-robust aggregation and update norm bounding: pure numpy over lists of deltas.

A plain (weighted) mean lets one party move the global model anywhere: a single delta
scaled by 100 or with its sign flipped outweighs every honest one. The functions here
bound that influence.

* :func:`coordinate_median` and :func:`trimmed_mean` replace the mean of K buffered deltas
  with a coordinate-wise order statistic (Yin, Chen, Ramchandran and Bartlett,
  "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018).
  Each coordinate of the result lies within the range of the honest values for that
  coordinate as long as fewer than half the deltas (median) or fewer than ``floor(beta*K)``
  (trimmed mean) are malicious, however large the malicious values are.
* :func:`clip_to_norm` scales a delta down to a global L2 norm bound (Sun, Kairouz, Suresh
  and McMahan, "Can You Really Backdoor Federated Learning?", 2019): one update can then
  move the model by at most the bound, which is what an asynchronous strategy that applies
  every update on its own needs, since it has nothing to take an order statistic over.

A delta is a list of arrays (one per model tensor, in model order). Inputs are only read,
never written (deltas decoded from a message body are read-only arrays). Results go to
``out`` buffers when the caller gives them (same shapes as the delta), else to fresh arrays.
The work is vectorised per tensor: the K values of a tensor are stacked into one
``(K, *shape)`` array (K is a buffer size, small) and reduced along axis 0, so the extra
memory is K times the largest tensor, not K times the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from messages.errors import ConfigError
from messages.types import NDArray, NDArrays


def trim_count(k: int, beta: float) -> int:
    """How many values :func:`trimmed_mean` drops from *each* end of ``k``: ``floor(beta*k)``.

    ``ConfigError`` unless ``0 <= beta < 0.5`` and at least one value remains
    (``k - 2 * floor(beta * k) >= 1``, which ``beta < 0.5`` already implies for ``k >= 1``).
    The rounding is down, as in ``scipy.stats.trim_mean``: ``beta=0.2`` trims nothing from 4
    values and one from 5. A product that float arithmetic puts a hair below an integer
    counts as that integer (``0.29 * 100`` is 28.999999999999996 and trims 29).
    """
    if not (isinstance(beta, int | float) and 0 <= beta < 0.5):
        raise ConfigError(f"trim fraction must be a number in [0, 0.5), got {beta!r}")
    if k < 1:
        raise ConfigError(f"a trimmed mean needs at least one value, got {k}")
    b = math.floor(beta * k + 1e-9)
    if k - 2 * b < 1:  # unreachable for beta < 0.5; kept so the promise is checked here
        raise ConfigError(f"trim fraction {beta} leaves no value of {k}")
    return b


def _stacked(deltas: Sequence[Sequence[NDArray]], i: int) -> NDArray:
    """Tensor ``i`` of every delta as one new ``(K, *shape)`` array (safe to reorder)."""
    return np.stack([d[i] for d in deltas], axis=0)


def _outputs(deltas: Sequence[Sequence[NDArray]], out: NDArrays | None) -> NDArrays:
    """Check the deltas agree in tensor count; ``out`` or fresh arrays of the first's shapes."""
    if not deltas:
        raise ValueError("robust aggregation needs at least one delta")
    n = len(deltas[0])
    for j, d in enumerate(deltas):
        if len(d) != n:
            raise ValueError(f"delta {j} has {len(d)} tensors, delta 0 has {n}")
    if out is None:
        return [np.empty(np.shape(t), dtype=np.result_type(t, np.float32)) for t in deltas[0]]
    if len(out) != n:
        raise ValueError(f"out has {len(out)} tensors, the deltas have {n}")
    return out


def coordinate_median(deltas: Sequence[Sequence[NDArray]], *, out: NDArrays | None = None
                      ) -> NDArrays:
    """The coordinate-wise median of ``K >= 1`` deltas (mean of the two middle values for an
    even K). Robust to fewer than K/2 arbitrary deltas (Yin et al. 2018).

    Returns ``out`` (or fresh arrays). ``ValueError`` for no deltas or deltas whose tensor
    counts or shapes differ.
    """
    result = _outputs(deltas, out)
    for i, o in enumerate(result):
        # the stack is our own copy, so the median may partition it in place
        np.median(_stacked(deltas, i), axis=0, out=o, overwrite_input=True)
    return result


def trimmed_mean(deltas: Sequence[Sequence[NDArray]], beta: float, *,
                 out: NDArrays | None = None) -> NDArrays:
    """The coordinate-wise beta-trimmed mean of ``K >= 1`` deltas: per coordinate, drop the
    ``floor(beta*K)`` largest and as many smallest values, average the rest. Robust to up to
    ``floor(beta*K)`` arbitrary deltas (Yin et al. 2018); ``beta = 0`` is the plain mean.

    Returns ``out`` (or fresh arrays). ``ConfigError`` for a ``beta`` outside ``[0, 0.5)``
    (see :func:`trim_count`); ``ValueError`` for no deltas or mismatched tensors.
    """
    k = len(deltas)
    b = trim_count(k, beta) if k else 0
    result = _outputs(deltas, out)
    for i, o in enumerate(result):
        values = _stacked(deltas, i)
        if b:
            # a partial sort is enough: rows b .. k-b-1 then hold exactly the kept values
            values.partition((b, k - b - 1), axis=0)
            values = values[b:k - b]
        np.mean(values, axis=0, out=o)
    return result


def global_norm(delta: Sequence[NDArray]) -> float:
    """The L2 norm of a delta taken over all its tensors together (as one flat vector)."""
    total = 0.0
    for t in delta:
        flat = np.ravel(t)
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def norm_scale(delta: Sequence[NDArray], bound: float) -> float:
    """``min(1, bound / ||delta||)``: the factor that brings ``delta`` within ``bound``.

    1.0 for a delta already within the bound (a zero delta included). ``ConfigError`` unless
    ``bound`` is a finite number > 0.
    """
    if not (isinstance(bound, int | float) and math.isfinite(bound) and bound > 0):
        raise ConfigError(f"update norm bound must be a finite number > 0, got {bound!r}")
    norm = global_norm(delta)
    return 1.0 if norm <= bound else bound / norm


def clip_to_norm(delta: Sequence[NDArray], bound: float, *, out: NDArrays | None = None
                 ) -> NDArrays:
    """``delta * min(1, bound / ||delta||)`` into ``out`` (or fresh arrays); ``delta`` is not
    changed. Afterwards the global L2 norm is at most ``bound`` (up to float rounding) and
    the direction is unchanged (Sun et al. 2019).

    ``ConfigError`` for a bad ``bound`` (see :func:`norm_scale`); ``ValueError`` when ``out``
    does not have one array per tensor.
    """
    scale = norm_scale(delta, bound)
    if out is None:
        out = [np.empty(np.shape(t), dtype=np.result_type(t, np.float32)) for t in delta]
    if len(out) != len(delta):
        raise ValueError(f"out has {len(out)} tensors, the delta has {len(delta)}")
    for d, o in zip(delta, out, strict=True):
        np.multiply(d, scale, out=o)
    return out
