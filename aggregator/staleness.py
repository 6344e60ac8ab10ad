"""Staleness weighting functions ``S(s)`` for asynchronous aggregation.

An update trained on global version ``base`` that reaches the aggregator when the global
model is at version ``current`` has staleness ``s = current - base >= 0``. Asynchronous
strategies scale its contribution by ``S(s)``, so updates computed from an old model pull
the global model less. Every function here satisfies ``S(0) = 1`` and ``0 < S(s) <= 1``,
and never increases with ``s``:

* ``constant``   ``S(s) = 1`` (staleness ignored)
* ``polynomial`` ``S(s) = (1 + s) ** -a``                         (``a > 0``, default 0.5)
* ``hinge``      ``S(s) = 1 if s <= b else 1 / (a * (s - b) + 1)`` (``a > 0`` default 10,
  ``b >= 0`` default 4)

The functions are from Xie, Koyejo and Gupta, "Asynchronous Federated Optimization" (2019).
Build one with :func:`make_staleness`; what it returns is a plain callable whose ``repr``
names the function and its parameters, for logs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

from messages.errors import ConfigError

StalenessFn = Callable[[int], float]
"""Maps a staleness ``s >= 0`` to a weight in ``(0, 1]``; raises ``ValueError`` for ``s < 0``."""

StalenessKind = Literal["constant", "polynomial", "hinge"]
STALENESS_FUNCTIONS: tuple[str, ...] = get_args(StalenessKind)
"""The names :func:`make_staleness` accepts, in the order a CLI should list them."""

DEFAULT_POLYNOMIAL_A = 0.5
DEFAULT_HINGE_A = 10.0
DEFAULT_HINGE_B = 4


def _check_staleness(s: int) -> None:
    """Reject a negative staleness: it means a version from the future, i.e. a caller bug."""
    if s < 0:
        raise ValueError(f"staleness must be >= 0, got {s}")


@dataclass(frozen=True, slots=True)
class _Constant:
    """``S(s) = 1``."""

    def __call__(self, s: int) -> float:
        _check_staleness(s)
        return 1.0

    def __repr__(self) -> str:
        return "constant()"


@dataclass(frozen=True, slots=True)
class _Polynomial:
    """``S(s) = (1 + s) ** -a``."""

    a: float

    def __call__(self, s: int) -> float:
        _check_staleness(s)
        return float((1.0 + s) ** -self.a)

    def __repr__(self) -> str:
        return f"polynomial(a={self.a:g})"


@dataclass(frozen=True, slots=True)
class _Hinge:
    """``S(s) = 1`` up to ``b``, then ``1 / (a * (s - b) + 1)``."""

    a: float
    b: int

    def __call__(self, s: int) -> float:
        _check_staleness(s)
        if s <= self.b:
            return 1.0
        return 1.0 / (self.a * (s - self.b) + 1.0)

    def __repr__(self) -> str:
        return f"hinge(a={self.a:g}, b={self.b})"


def _valid_a(name: str, a: float | None, default: float) -> float:
    """``a`` itself, or ``default`` when None; ConfigError unless it is finite and > 0."""
    if a is None:
        return default
    if isinstance(a, bool) or not isinstance(a, int | float) or not (
        math.isfinite(a) and a > 0
    ):
        raise ConfigError(f"staleness {name}: a must be a finite number > 0, got {a!r}")
    return float(a)


def _valid_b(name: str, b: int | None, default: int) -> int:
    """``b`` itself, or ``default`` when None; ConfigError unless it is an integer >= 0."""
    if b is None:
        return default
    if isinstance(b, bool) or not isinstance(b, int) or b < 0:
        raise ConfigError(f"staleness {name}: b must be an integer >= 0, got {b!r}")
    return b


def make_staleness(name: str, *, a: float | None = None, b: int | None = None) -> StalenessFn:
    """Build the staleness function called ``name`` (one of :data:`STALENESS_FUNCTIONS`).

    ``a`` and ``b`` default, when None, to the function's own defaults (polynomial ``a=0.5``;
    hinge ``a=10``, ``b=4``). A parameter the chosen function does not use is ignored and not
    validated, so one configuration can carry ``a`` and ``b`` whatever the function.

    Raises ``ConfigError`` for an unknown name, ``a <= 0`` (or not finite) or ``b < 0`` (or not
    an integer). The returned function raises ``ValueError`` when called with ``s < 0``.
    """
    if name == "constant":
        return _Constant()
    if name == "polynomial":
        return _Polynomial(a=_valid_a(name, a, DEFAULT_POLYNOMIAL_A))
    if name == "hinge":
        return _Hinge(a=_valid_a(name, a, DEFAULT_HINGE_A), b=_valid_b(name, b, DEFAULT_HINGE_B))
    raise ConfigError(
        f"unknown staleness function {name!r}; allowed: {', '.join(STALENESS_FUNCTIONS)}"
    )
