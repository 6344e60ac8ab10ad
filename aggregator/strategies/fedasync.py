"""FedAsync (Xie et al. 2019) in delta form."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from aggregator.staleness import StalenessFn
from aggregator.strategies.base import (
    Contribution,
    Outcome,
    Strategy,
    _buffers_like,
    _check_name,
    _check_shapes,
    _load_optimizer,
    axpy,
)
from aggregator.strategies.optimizers import Plain, ServerOptimizer, staleness_scaled
from messages.errors import ConfigError
from messages.types import NDArray, NDArrays


class FedAsync(Strategy):
    """FedAsync (Xie et al. 2019) in delta form: ``w += alpha * S(s) * d`` for every update.

    Every offer is :attr:`Outcome.APPLIED`. ``alpha`` is the mixing weight in ``(0, 1]``
    (``ConfigError`` otherwise); ``staleness`` maps an update's staleness to ``S(s)``. A
    contribution's ``scale`` (set by ``Clipped``) folds into the same multiply. Holds no
    state between offers apart from a scratch buffer.
    """

    name: ClassVar[str] = "fedasync"

    def __init__(self, staleness: StalenessFn, alpha: float = 0.6,
                 optimizer: ServerOptimizer | None = None,
                 staleness_threshold: int | None = None) -> None:
        if not (isinstance(alpha, int | float) and 0 < alpha <= 1):
            raise ConfigError(f"fedasync alpha must be a number in (0, 1], got {alpha!r}")
        self.staleness = staleness
        self.alpha = float(alpha)
        self.optimizer = optimizer or Plain()
        self.staleness_threshold = staleness_threshold
        self._scratch: list[NDArray] | None = None

    def offer(self, weights: NDArrays, c: Contribution) -> Outcome:
        """Apply ``c`` at once: ``w += alpha * S(c.staleness) * c.scale * c.delta`` (through
        the server optimizer, ``alpha`` its step); always APPLIED."""
        _check_shapes(weights, c.delta, f"delta from {c.party!r}")
        lr = staleness_scaled(self.alpha, c.staleness, self.staleness_threshold)
        coef = float(self.staleness(c.staleness)) * c.scale
        if isinstance(self.optimizer, Plain):  # the hot path: one pass, no temporary
            for w, d in zip(weights, c.delta, strict=True):
                axpy(lr * coef, d, w)
            return Outcome.APPLIED
        self._scratch = scratch = _buffers_like(self._scratch, weights)
        for d, tmp in zip(c.delta, scratch, strict=True):
            np.multiply(d, coef, out=tmp)
        self.optimizer.step(weights, scratch, lr)
        return Outcome.APPLIED

    def state(self) -> dict[str, Any]:
        """The name and the server optimizer's state."""
        return {"strategy": self.name, "optimizer": self.optimizer.state()}

    def load_state(self, state: dict[str, Any]) -> None:
        """Check the snapshot is FedAsync's; restore the server optimizer."""
        _check_name(state, self.name)
        _load_optimizer(self.optimizer, state)
