"""Fixed point modulo 2^32 for masked deltas, with head room for a full buffer.

A party clips its delta to L2 norm ``C``, so every coordinate lies in ``[-C, C]``; it maps each
coordinate ``x`` to the integer ``q = floor(x * s + u)`` with ``u`` uniform in ``[0, 1)``
(stochastic rounding: ``E[q] = x * s``, so the error averages away), and keeps ``q`` modulo
2^32. The leader sums ``K`` such vectors with integer weights ``w_i`` in ``1..W``.

The bound (what ``scale_for`` guarantees): ``|q| <= C*s + 1 <= B`` where
``B = floor((2^31 - 1) / (K*W))``, so ``|sum w_i q_i| <= K*W*B <= 2^31 - 1``: the weighted
sum, read back as a signed 32-bit integer, is exact and cannot wrap. Dequantized, the weighted
mean differs from the mean of the clipped float deltas by less than ``1/s`` per coordinate
(each rounding moves a value by less than one unit).
"""

from __future__ import annotations

import math

import numpy as np

from messages.errors import ConfigError
from messages.types import NDArray, NDArrays

RING = 1 << 32
"""Arithmetic is modulo 2^32 (numpy ``uint32`` wraps exactly so)."""
LIMIT = (1 << 31) - 1
"""The largest magnitude a signed 32-bit sum may reach without wrapping."""


def scale_for(clip: float, k: int, max_weight: int) -> float:
    """The fixed-point scale ``s`` for deltas clipped to ``clip``, summed ``k`` at a time with
    integer weights of at most ``max_weight`` (see the module docstring for the bound).

    ``ConfigError`` when the three leave less than one unit of resolution per ``clip``.
    """
    if not (math.isfinite(clip) and clip > 0):
        raise ConfigError(f"secure aggregation clip {clip!r}: must be a finite L2 norm > 0")
    if k < 1 or max_weight < 1:
        raise ConfigError(f"secure aggregation needs k >= 1 and max weight >= 1, got k={k}, "
                          f"max weight={max_weight}")
    per_update = LIMIT // (k * max_weight)
    if per_update < 4:
        raise ConfigError(f"k={k} updates of weight up to {max_weight} leave no head room in "
                          "32 bits: lower the buffer size or the weight levels")
    return (per_update - 1) / clip


def clip_l2(delta: NDArrays, clip: float) -> tuple[NDArrays, float]:
    """``delta`` scaled to L2 norm at most ``clip`` (over all tensors), as float64 copies,
    and its norm before clipping."""
    norm = math.sqrt(sum(float(np.dot(d.ravel().astype(np.float64), d.ravel()))
                         for d in delta))
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return [np.asarray(d, dtype=np.float64) * factor for d in delta], norm


def quantize(x: NDArray, scale: float, clip: float, rng: np.random.Generator) -> NDArray:
    """``floor(x * scale + u)`` modulo 2^32 as ``uint32`` (same shape), ``u ~ U[0, 1)``.

    ``x`` must already be clipped; it is clamped to ``[-clip, clip]`` again so that float
    rounding can never break the head-room bound.
    """
    y = np.clip(np.asarray(x, dtype=np.float64), -clip, clip) * scale
    y += rng.random(y.shape)
    q = np.floor(y).astype(np.int64)
    return q.astype(np.int32).view(np.uint32)


def dequantize(total: NDArray, scale: float, weight_sum: int) -> NDArray:
    """The weighted mean as float32 from a weighted sum of quantized vectors modulo 2^32."""
    signed = np.asarray(total, dtype=np.uint32).view(np.int32)
    return (signed.astype(np.float64) / (scale * weight_sum)).astype(np.float32)


def integer_weights(weights: list[float], max_weight: int) -> list[int]:
    """Real mixing weights (sample count times staleness factor) as integers in
    ``1..max_weight``, proportional up to rounding: the largest becomes ``max_weight``."""
    top = max(weights)
    if not (math.isfinite(top) and top > 0):
        raise ValueError(f"weights must be positive and finite, got {weights}")
    return [max(1, min(max_weight, round(max_weight * w / top))) for w in weights]
