"""Server optimizers: how a strategy's aggregated delta moves the global weights.

Every strategy ends in ``w += lr * d``, where ``d`` is what it aggregated (FedAsync: one
update's delta; FedBuff and FedAvg: a weighted mean of deltas) and ``lr`` its step (FedAsync
``alpha * S(s)``, FedBuff and FedAvg ``eta``). A server optimizer replaces that last step,
treating ``d`` as a pseudo-gradient (Reddi et al., "Adaptive Federated Optimization", ICLR
2021), so that under skewed data the server smooths the directions parties pull in:

* ``plain``: ``w += lr * d`` (what every strategy did before; the default);
* ``momentum`` (FedAvgM, Hsu et al. 2019): ``m = beta1 * m + d``, ``w += lr * m``;
* ``adam`` (FedAdam): ``m = beta1 * m + (1 - beta1) * d``,
  ``v = beta2 * v + (1 - beta2) * d^2``, ``w += lr * m / (sqrt(v) + tau)``;
* ``yogi`` (FedYogi): as adam, but ``v = v - (1 - beta2) * d^2 * sign(v - d^2)``, which
  grows ``v`` more slowly when gradients shrink.

FedAdam and FedYogi have no bias correction and start ``v`` at ``tau^2`` (as in the paper);
their step is about ``lr`` per coordinate whatever the size of ``d``, so their ``lr`` is
set far lower than plain FedBuff's ``eta`` of 1 (``--eta``/``--mixing-alpha`` then read as
the server learning rate). The state (``m``, ``v``) is part of the strategy's checkpoint, so
a restart continues the optimizer exactly. Pure numpy, in preallocated buffers.
"""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar, Literal, get_args

import numpy as np

from aggregator.strategies.base import axpy
from messages.errors import ConfigError
from messages.types import NDArray, NDArrays

ServerOptimizerName = Literal["plain", "momentum", "adam", "yogi"]
SERVER_OPTIMIZERS: tuple[str, ...] = get_args(ServerOptimizerName)
"""The names :func:`make_optimizer` accepts."""


def _zeros_like(buffers: list[NDArray] | None, weights: NDArrays, fill: float = 0.0
                ) -> list[NDArray]:
    if buffers is not None and len(buffers) == len(weights) and all(
            b.shape == w.shape for b, w in zip(buffers, weights, strict=True)):
        return buffers
    return [np.full(w.shape, fill, dtype=w.dtype) for w in weights]


class ServerOptimizer(abc.ABC):
    """One way to apply an aggregated delta (see the module docstring)."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self._scratch: list[NDArray] | None = None

    @abc.abstractmethod
    def step(self, weights: NDArrays, direction: NDArrays, lr: float) -> None:
        """Move ``weights`` in place by ``lr`` along ``direction`` as this optimizer does;
        ``direction`` is only read."""

    def state(self) -> dict[str, Any]:
        """What the optimizer holds between steps (copies), for checkpoints."""
        return {"optimizer": self.name}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state`; ``ValueError`` for another optimizer's snapshot."""
        if state.get("optimizer", self.name) != self.name:
            raise ValueError(f"server optimizer state of {state.get('optimizer')!r} cannot be "
                             f"loaded into {self.name!r}")


class Plain(ServerOptimizer):
    """``w += lr * d``."""

    name: ClassVar[str] = "plain"

    def step(self, weights: NDArrays, direction: NDArrays, lr: float) -> None:
        for w, d in zip(weights, direction, strict=True):
            axpy(lr, d, w)


class Momentum(ServerOptimizer):
    """Server momentum (FedAvgM): ``m = beta1 * m + d``, ``w += lr * m``."""

    name: ClassVar[str] = "momentum"

    def __init__(self, beta1: float = 0.9) -> None:
        super().__init__()
        self.beta1 = beta1
        self.m: list[NDArray] | None = None

    def step(self, weights: NDArrays, direction: NDArrays, lr: float) -> None:
        self.m = m = _zeros_like(self.m, weights)
        self._scratch = tmp = _zeros_like(self._scratch, weights)
        for w, d, mi, t in zip(weights, direction, m, tmp, strict=True):
            mi *= self.beta1
            mi += d
            np.multiply(mi, lr, out=t)
            w += t

    def state(self) -> dict[str, Any]:
        return {"optimizer": self.name, "m": [] if self.m is None else [a.copy() for a in self.m]}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.m = [np.array(a, copy=True) for a in state.get("m", [])] or None


class Adam(ServerOptimizer):
    """FedAdam: the adaptive step of Reddi et al. 2021 (see the module docstring)."""

    name: ClassVar[str] = "adam"

    def __init__(self, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__()
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self.m: list[NDArray] | None = None
        self.v: list[NDArray] | None = None

    def _second_moment(self, v: NDArray, d2: NDArray) -> None:
        """``v = beta2 * v + (1 - beta2) * d^2``, in place (``d2`` may be overwritten)."""
        v *= self.beta2
        d2 *= 1 - self.beta2
        v += d2

    def step(self, weights: NDArrays, direction: NDArrays, lr: float) -> None:
        self.m = m = _zeros_like(self.m, weights)
        self.v = v = _zeros_like(self.v, weights, self.tau**2)
        self._scratch = tmp = _zeros_like(self._scratch, weights)
        for w, d, mi, vi, t in zip(weights, direction, m, v, tmp, strict=True):
            mi *= self.beta1
            np.multiply(d, 1 - self.beta1, out=t)
            mi += t
            np.multiply(d, d, out=t)
            self._second_moment(vi, t)
            np.sqrt(vi, out=t)
            t += self.tau
            np.divide(mi, t, out=t)
            t *= lr
            w += t

    def state(self) -> dict[str, Any]:
        def copies(x: list[NDArray] | None) -> list[NDArray]:
            return [] if x is None else [a.copy() for a in x]
        return {"optimizer": self.name, "m": copies(self.m), "v": copies(self.v)}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.m = [np.array(a, copy=True) for a in state.get("m", [])] or None
        self.v = [np.array(a, copy=True) for a in state.get("v", [])] or None


class Yogi(Adam):
    """FedYogi: Adam with ``v = v - (1 - beta2) * d^2 * sign(v - d^2)``."""

    name: ClassVar[str] = "yogi"

    def _second_moment(self, v: NDArray, d2: NDArray) -> None:
        sign = np.sign(v - d2)  # one temporary per tensor: an apply is rare next to offers
        d2 *= 1 - self.beta2
        d2 *= sign
        v -= d2


def make_optimizer(name: str, *, beta1: float = 0.9, beta2: float = 0.99,
                   tau: float = 1e-3) -> ServerOptimizer:
    """The server optimizer ``name`` (one of :data:`SERVER_OPTIMIZERS`); ``ConfigError``
    for an unknown name or settings outside ``0 <= beta1 < 1``, ``0 < beta2 < 1``,
    ``tau > 0``."""
    if name not in SERVER_OPTIMIZERS:
        raise ConfigError(f"unknown server optimizer {name!r}; allowed: "
                          f"{', '.join(SERVER_OPTIMIZERS)}")
    if not 0 <= beta1 < 1:
        raise ConfigError(f"--server-beta1 {beta1!r}: must be in [0, 1)")
    if not 0 < beta2 < 1:
        raise ConfigError(f"--server-beta2 {beta2!r}: must be in (0, 1)")
    if not (math.isfinite(tau) and tau > 0):
        raise ConfigError(f"--server-tau {tau!r}: must be a finite number > 0")
    if name == "momentum":
        return Momentum(beta1)
    if name == "adam":
        return Adam(beta1, beta2, tau)
    if name == "yogi":
        return Yogi(beta1, beta2, tau)
    return Plain()


def staleness_scaled(lr: float, staleness: int, threshold: int | None) -> float:
    """FADAS's staleness-aware step (Wang et al., ICML 2024): past ``threshold`` versions of
    staleness the step shrinks in proportion, ``lr * threshold / staleness``."""
    if threshold is None or staleness <= threshold:
        return lr
    return lr * max(threshold, 1) / staleness
