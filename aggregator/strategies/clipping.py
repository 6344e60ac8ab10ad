"""Clipping as a stage in front of any strategy (in the manner of Flower's strategy wrappers).

``Clipped(strategy, bound)`` scales every contribution's delta down to at most ``bound`` in
global L2 norm, ``d * min(1, bound / ||d||)`` (Sun et al. 2019), then hands it on: it sets
the contribution's ``scale``, which the strategy folds into its own multiply, so clipping
costs one pass over the delta (the norm) and no model-sized copy. Everything else (state,
membership, the name) is the wrapped strategy's, so checkpoints are unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from aggregator import robust
from aggregator.strategies.base import Contribution, Outcome, Strategy
from messages.errors import ConfigError
from messages.types import NDArrays


def check_norm_bound(bound: float | None, who: str) -> float | None:
    """``bound`` as a float, None for no bound; ``ConfigError`` unless finite and > 0."""
    if bound is None:
        return None
    if isinstance(bound, bool) or not (
            isinstance(bound, int | float) and math.isfinite(bound) and bound > 0):
        raise ConfigError(f"{who} max_update_norm must be a finite number > 0 or None, "
                          f"got {bound!r}")
    return float(bound)


class Clipped(Strategy):
    """``inner`` with every delta clipped to L2 norm ``max_update_norm`` first."""

    def __init__(self, inner: Strategy, max_update_norm: float) -> None:
        bound = check_norm_bound(max_update_norm, inner.name)
        assert bound is not None
        self.inner = inner
        self.max_update_norm = bound
        self.name = inner.name  # type: ignore[misc]

    def __getattr__(self, name: str) -> Any:
        """The wrapped strategy's attributes (``k``, ``aggregation``, ``count``, ...)."""
        return getattr(self.inner, name)

    def offer(self, weights: NDArrays, c: Contribution) -> Outcome:
        scale = c.scale * robust.norm_scale(c.delta, self.max_update_norm)
        return self.inner.offer(weights, dataclasses.replace(c, scale=scale))

    def parties_changed(self, weights: NDArrays, active: frozenset[str]) -> bool:
        return self.inner.parties_changed(weights, active)

    def state(self) -> dict[str, Any]:
        return self.inner.state()

    def load_state(self, state: dict[str, Any]) -> None:
        self.inner.load_state(state)
