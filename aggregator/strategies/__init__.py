"""Aggregation strategies: how party updates (deltas) are merged into the global weights.

Every strategy works on the caller's ``weights`` (a list of float32 arrays in model order)
and changes them **in place**: the array objects stay the same, only their contents
change, and only when :meth:`Strategy.offer` returns :attr:`Outcome.APPLIED` or
:meth:`Strategy.parties_changed` returns True. On either, the caller bumps the global version
and broadcasts the new weights. A delta is ``local_weights - base_weights`` as the party
computed it; deltas must have exactly the shapes of ``weights`` (``ValueError`` otherwise)
and are only read, never written.

* :class:`FedAsync` (Xie et al. 2019): every update is applied at once,
  ``w += alpha * S(s) * d``.
* :class:`FedBuff` (Nguyen et al. 2022): ``k`` updates are buffered as a running weighted
  sum, then ``w += eta * sum(n_k S(s_k) d_k) / sum(n_k S(s_k))``; or, for robustness to
  malicious parties, the ``k`` deltas are kept and ``w += eta * median(d_1..d_k)`` (or their
  trimmed mean), coordinate-wise (:mod:`aggregator.robust`).
* :class:`FedAvg` (McMahan et al. 2017), the synchronous baseline: a round waits for one
  fresh update from every participating party, then ``w += eta * sum(n_k d_k) / sum(n_k)``.

Hot paths use preallocated buffers (``np.multiply(..., out=...)``, ``np.add(..., out=...)``),
allocated on first use with the shapes and dtype of ``weights``, so applying an update makes
no model-sized temporaries (FedBuff's robust modes excepted: an order statistic stacks the
K buffered values of one tensor at a time, and a clipped delta is kept as a copy). A
strategy is not thread-safe: call it from one thread.

:meth:`Strategy.state` and :meth:`Strategy.load_state` checkpoint whatever a strategy holds
between applies (FedBuff's buffer, FedAvg's round); restoring into a strategy built with the
same options continues exactly as the original would have.

A server optimizer (``aggregator.strategies.optimizers``: plain, momentum, adam, yogi) takes
each strategy's last step, ``w += lr * d``, with ``d`` as a pseudo-gradient.

``Clipped`` (``max_update_norm``, FedAsync and FedBuff) scales every delta down to that global
L2 norm before the strategy uses it, so no single update moves the model further than the
bound. One module per strategy; ``base`` says what a new one must implement.
"""

from __future__ import annotations

from typing import Literal, get_args

from aggregator.staleness import StalenessFn
from aggregator.strategies.base import Contribution, Outcome, Strategy
from aggregator.strategies.clipping import Clipped
from aggregator.strategies.fedasync import FedAsync
from aggregator.strategies.fedavg import FedAvg
from aggregator.strategies.fedbuff import AGGREGATIONS, Aggregation, FedBuff
from aggregator.strategies.optimizers import (
    SERVER_OPTIMIZERS,
    ServerOptimizer,
    ServerOptimizerName,
    make_optimizer,
)
from messages.errors import ConfigError

__all__ = ["AGGREGATIONS", "SERVER_OPTIMIZERS", "STRATEGIES", "Aggregation", "Clipped",
           "Contribution", "FedAsync", "FedAvg", "FedBuff", "Outcome", "ServerOptimizer",
           "ServerOptimizerName", "Strategy", "StrategyName", "make_optimizer", "make_strategy"]

StrategyName = Literal["fedasync", "fedbuff", "fedavg"]
STRATEGIES: tuple[str, ...] = get_args(StrategyName)
"""The names :func:`make_strategy` accepts."""


def make_strategy(
    name: str, *, staleness: StalenessFn, alpha: float, k: int, eta: float,
    aggregation: str = "mean", trim_fraction: float = 0.2,
    max_update_norm: float | None = None, optimizer: ServerOptimizer | None = None,
    staleness_threshold: int | None = None,
) -> Strategy:
    """Build the strategy called ``name`` (one of :data:`STRATEGIES`) from the options.

    Each strategy takes the options it uses and ignores the rest: fedasync ``staleness``
    and ``alpha``; fedbuff ``staleness``, ``k``, ``eta``, ``aggregation`` and
    ``trim_fraction``; fedavg ``eta``. ``optimizer`` (a server optimizer, plain by default)
    takes every strategy's last step; ``staleness_threshold`` (fedasync, fedbuff) shrinks
    that step past so many versions of staleness. ``max_update_norm`` wraps the strategy in
    :class:`Clipped`. The robustness
    options are the exception, because ignoring them would silently leave a federation
    unprotected: an ``aggregation`` other than ``"mean"`` needs fedbuff, and
    ``max_update_norm`` needs fedasync or fedbuff. ``ConfigError`` for those, an unknown name
    or an out-of-range option of the chosen strategy.
    """
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; allowed: {', '.join(STRATEGIES)}")
    if aggregation != "mean" and name != "fedbuff":
        raise ConfigError(f"aggregation {aggregation!r} needs strategy fedbuff, not {name!r}")
    if max_update_norm is not None and name == "fedavg":
        raise ConfigError("max_update_norm needs strategy fedasync or fedbuff, not 'fedavg'")
    strategy: Strategy
    if name == "fedasync":
        strategy = FedAsync(staleness, alpha=alpha, optimizer=optimizer,
                            staleness_threshold=staleness_threshold)
    elif name == "fedbuff":
        strategy = FedBuff(staleness, k=k, eta=eta, aggregation=aggregation,
                           trim_fraction=trim_fraction, optimizer=optimizer,
                           staleness_threshold=staleness_threshold)
    else:
        strategy = FedAvg(eta=eta, optimizer=optimizer)
    return strategy if max_update_norm is None else Clipped(strategy, max_update_norm)
