"""FedBuff (Nguyen et al. 2022): buffered asynchronous aggregation, with robust modes."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, get_args

import numpy as np

from aggregator import robust
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

Aggregation = Literal["mean", "median", "trimmed-mean"]
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
"""How :class:`FedBuff` combines a full buffer: weighted mean, coordinate-wise median or
trimmed mean."""


class FedBuff(Strategy):
    """FedBuff (Nguyen et al. 2022): buffer ``k`` updates, then apply their weighted mean.

    Offers 1 .. k-1 of a buffer are :attr:`Outcome.BUFFERED`; the k-th applies the buffer,
    empties it and is :attr:`Outcome.APPLIED`. The same party may appear more than once in a
    buffer. A contribution whose weight ``n * S(s)`` is not a positive finite number (``S``
    underflowed to 0) carries no information and is :attr:`Outcome.DISCARDED` without
    entering the buffer. How the buffer is applied depends on ``aggregation``:

    * ``"mean"`` (default, the fast path): each contribution adds ``n * S(s) * d`` to a
      running sum (one accumulator per tensor, in the weights' dtype) and ``n * S(s)`` to a
      scalar weight sum; deltas themselves are not kept. The k-th offer applies
      ``w += eta * sum / weight_sum``.
    * ``"median"`` / ``"trimmed-mean"``: the buffer keeps the k deltas themselves (references;
      they are read-only, see :class:`Contribution`) and the k-th offer applies
      ``w += eta * median(d_1 .. d_k)``, or the mean after dropping the
      ``floor(trim_fraction * k)`` largest and smallest values, coordinate by coordinate
      (:mod:`aggregator.robust`, Yin et al. 2018). The median resists fewer than k/2
      malicious deltas per buffer, the trimmed mean up to ``floor(trim_fraction * k)``
      (a party faster than the others can fill several slots of one buffer).
      Order statistics are unweighted: sample counts and staleness weights do not enter
      them (a weight would let a malicious party buy influence by claiming many samples);
      staleness only decides, as in mean mode, whether a contribution is kept at all.

    A contribution's ``scale`` (set by ``Clipped``) folds into mean mode's multiply; the
    robust modes keep a scaled copy.

    ``k >= 1``, ``eta > 0`` (server learning rate), ``aggregation`` one of
    :data:`AGGREGATIONS`, ``0 <= trim_fraction < 0.5``, else ``ConfigError``.
    Configurations that are the plain mean in disguise are refused too: a robust mode with
    ``k < 3`` (the median of two values is their mean) and a trimmed mean that trims
    nothing (``floor(trim_fraction * k) = 0``, e.g. 0.2 of 4).
    """

    name: ClassVar[str] = "fedbuff"

    def __init__(self, staleness: StalenessFn, k: int = 4, eta: float = 1.0,
                 aggregation: str = "mean", trim_fraction: float = 0.2,
                 optimizer: ServerOptimizer | None = None,
                 staleness_threshold: int | None = None) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"fedbuff k must be an integer >= 1, got {k!r}")
        if not (isinstance(eta, int | float) and math.isfinite(eta) and eta > 0):
            raise ConfigError(f"fedbuff eta must be a finite number > 0, got {eta!r}")
        if aggregation not in AGGREGATIONS:
            raise ConfigError(f"fedbuff aggregation must be one of {', '.join(AGGREGATIONS)}, "
                              f"got {aggregation!r}")
        trimmed = robust.trim_count(k, trim_fraction)  # validates the fraction in every mode
        if aggregation != "mean" and k < 3:  # of 1 or 2 values, both are the plain mean
            raise ConfigError(f"fedbuff {aggregation} needs k >= 3 to outvote a malicious "
                              f"delta, got k={k}")
        if aggregation == "trimmed-mean" and trimmed == 0:
            raise ConfigError(
                f"fedbuff trimmed-mean with k={k} and trim fraction {trim_fraction} trims "
                f"nothing (floor({trim_fraction} * {k}) = 0): use a trim fraction of at "
                f"least {1 / k:.3g} or a larger k")
        self.staleness = staleness
        self.k = k
        self.eta = float(eta)
        self.aggregation = aggregation
        self.trim_fraction = float(trim_fraction)
        self._acc: list[NDArray] | None = None
        self._scratch: list[NDArray] | None = None
        self._weight_sum = 0.0
        self._parties: list[str] = []
        self.optimizer = optimizer or Plain()
        self.staleness_threshold = staleness_threshold
        self._max_staleness = 0  # of the buffer: FADAS shrinks its step past the threshold
        # the robust modes keep the deltas themselves: a class of their own
        self._robust = (RobustBuffer(aggregation, self.trim_fraction)
                        if aggregation != "mean" else None)

    @property
    def count(self) -> int:
        """How many contributions are in the buffer now (0 .. k-1 between offers)."""
        return len(self._parties)

    @property
    def _kept(self) -> list[tuple[NDArrays, int, int]]:
        return self._robust.kept if self._robust is not None else []

    @property
    def parties(self) -> tuple[str, ...]:
        """The parties whose contributions are in the buffer, in arrival order."""
        return tuple(self._parties)

    def offer(self, weights: NDArrays, c: Contribution) -> Outcome:
        """Add ``c`` to the buffer; on the k-th contribution apply the buffer to ``weights``."""
        _check_shapes(weights, c.delta, f"delta from {c.party!r}")
        weight = c.num_samples * float(self.staleness(c.staleness))
        if not (math.isfinite(weight) and weight > 0):
            return Outcome.DISCARDED
        scale = c.scale
        if self.aggregation == "mean":
            self._add_to_sum(weights, c.delta, weight, scale)
        else:
            assert self._robust is not None
            self._robust.add(weights, c)
        self._parties.append(c.party)
        self._max_staleness = max(self._max_staleness, c.staleness)
        if len(self._parties) < self.k:
            return Outcome.BUFFERED
        lr = staleness_scaled(self.eta, self._max_staleness, self.staleness_threshold)
        if self._robust is None:
            self._apply_sum(weights, lr)
        else:
            self._scratch = self._robust.apply(weights, lr, self._scratch, self.optimizer)
        self._parties.clear()
        self._max_staleness = 0
        return Outcome.APPLIED

    def offer_sum(self, weights: NDArrays, total: NDArrays, weight: float,
                  parties: list[str], max_staleness: int) -> Outcome:
        """Add an edge's partial sum (``sum n_i * S(s_i) * d_i`` over ``parties``, and the sum
        of those weights) to the buffer, as if each member had been offered (mean mode
        only); apply the buffer once it holds ``k`` or more contributions."""
        if self.aggregation != "mean":
            raise ValueError("a partial sum can only join a mean-mode buffer")
        _check_shapes(weights, total, "partial sum")
        if not parties or not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"a partial sum needs members and a positive weight, got "
                             f"{len(parties)} and {weight}")
        acc = self._acc
        if acc is None or not self._parties:
            acc = _buffers_like(acc, weights)
        self._acc = acc
        for a, t in zip(acc, total, strict=True):
            axpy(1.0, t, a)
        self._weight_sum += weight
        self._parties.extend(parties)
        self._max_staleness = max(self._max_staleness, max_staleness)
        if len(self._parties) < self.k:
            return Outcome.BUFFERED
        self._apply_sum(weights, staleness_scaled(self.eta, self._max_staleness,
                                                  self.staleness_threshold))
        self._parties.clear()
        self._max_staleness = 0
        return Outcome.APPLIED

    def _add_to_sum(self, weights: NDArrays, delta: NDArrays, weight: float,
                    scale: float) -> None:
        """Mean mode: ``acc += weight * scale * delta``, ``weight_sum += weight``."""
        acc = self._acc
        if acc is None or not self._parties:
            acc = _buffers_like(acc, weights)  # empty buffer: (re)allocate freely
        else:
            _check_shapes(weights, acc, "buffered sum")  # never drop a non-empty buffer
        self._acc = acc
        for a, d in zip(acc, delta, strict=True):
            axpy(weight * scale, d, a)
        self._weight_sum += weight

    def _apply_sum(self, weights: NDArrays, lr: float) -> None:
        """Mean mode: ``w += lr * acc / weight_sum`` (through the server optimizer); empty
        the running sum."""
        assert self._acc is not None
        for a in self._acc:
            np.multiply(a, 1 / self._weight_sum, out=a)
        self.optimizer.step(weights, self._acc, lr)
        for a in self._acc:
            a.fill(0)
        self._weight_sum = 0.0

    def state(self) -> dict[str, Any]:
        """``aggregation``, ``count`` and ``parties`` (arrival order); in mean mode the
        running sum as ``accumulator`` (copies; empty list before the first offer) and
        ``weight_sum``; in the robust modes the kept ``deltas`` (one list of arrays per
        contribution) with their ``num_samples`` and ``staleness``. The keys of the other
        mode are present and empty."""
        return {
            "strategy": self.name,
            "aggregation": self.aggregation,
            "accumulator": [] if self._acc is None else [a.copy() for a in self._acc],
            "weight_sum": self._weight_sum,
            "count": len(self._parties),
            "parties": list(self._parties),
            "deltas": [list(d) for d, _, _ in self._kept],  # immutable: references suffice
            "num_samples": [n for _, n, _ in self._kept],
            "staleness": [s for _, _, s in self._kept],
            "max_staleness": self._max_staleness,
            "optimizer": self.optimizer.state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore the buffer. A buffer holding ``k`` or more (saved with a larger ``k``) is
        applied by the next offer.

        Kept deltas saved in a robust mode load into mean mode too: they are folded into
        the running sum with this strategy's staleness function, exactly as mean mode would
        have. The reverse is impossible (a running sum has no deltas to take a median of):
        a non-empty mean-mode buffer loaded into a robust mode raises ``ValueError``, as
        does a snapshot that is inconsistent. A snapshot from before the robust modes (no
        ``deltas`` key) is a mean-mode one."""
        _check_name(state, self.name)
        parties = [str(p) for p in state["parties"]]
        if int(state["count"]) != len(parties):
            raise ValueError(f"fedbuff state: count {state['count']} but {len(parties)} parties")
        acc = [np.array(a, dtype=np.float32, copy=True) for a in state["accumulator"]]
        deltas = [[np.asarray(a) for a in d] for d in state.get("deltas", [])]
        counts = [int(n) for n in state.get("num_samples", [])]
        stale = [int(s) for s in state.get("staleness", [])]
        if not len(deltas) == len(counts) == len(stale):
            raise ValueError("fedbuff state: deltas, num_samples and staleness differ in length")
        if deltas and len(deltas) != len(parties):
            raise ValueError(f"fedbuff state: {len(deltas)} deltas but {len(parties)} parties")
        if parties and not acc and not deltas:
            raise ValueError("fedbuff state: buffered parties but no accumulator or deltas")
        kept = list(zip(deltas, counts, stale, strict=True))
        weight_sum = float(state["weight_sum"])
        if self.aggregation == "mean" and kept:
            acc, weight_sum = self._sum_of(kept)
        elif self.aggregation != "mean" and parties and not kept:
            raise ValueError(
                f"fedbuff state: a running sum of {len(parties)} updates (aggregation 'mean') "
                f"cannot be loaded with aggregation {self.aggregation!r}; resume with "
                "aggregation 'mean' until the buffer is applied, or start without the "
                "checkpoint")
        self._acc = acc or None
        self._weight_sum = weight_sum
        self._parties = parties
        self._max_staleness = int(state.get("max_staleness", max(stale, default=0)))
        _load_optimizer(self.optimizer, state)
        if self._robust is not None:
            self._robust.kept = kept

    def _sum_of(self, kept: list[tuple[NDArrays, int, int]]) -> tuple[list[NDArray], float]:
        """The running sum and weight sum mean mode would hold after ``kept``, in order."""
        acc = [np.zeros(np.shape(t), dtype=np.float32) for t in kept[0][0]]
        total = 0.0
        for delta, n, s in kept:
            weight = n * float(self.staleness(s))
            for a, d in zip(acc, delta, strict=True):
                axpy(weight, np.asarray(d, dtype=np.float32), a)  # as _add_to_sum rounds
            total += weight
        return acc, total


class RobustBuffer:
    """FedBuff's robust modes: the buffer keeps the deltas themselves (references; they are
    read-only), and a full buffer applies ``w += eta * median(d_1 .. d_k)`` or their trimmed
    mean, coordinate by coordinate (``aggregator.robust``). Unweighted on purpose: a weight
    would let a malicious party buy influence by claiming many samples."""

    def __init__(self, aggregation: str, trim_fraction: float) -> None:
        self.aggregation = aggregation
        self.trim_fraction = trim_fraction
        self.kept: list[tuple[NDArrays, int, int]] = []  # delta, num_samples, staleness

    def add(self, weights: NDArrays, c: Contribution) -> None:
        """Keep ``c``'s delta (a scaled copy when a stage set its ``scale``)."""
        if self.kept:
            _check_shapes(weights, self.kept[0][0], "buffered delta")  # never drop them
        delta = c.delta if c.scale == 1.0 else [np.multiply(d, c.scale) for d in c.delta]
        self.kept.append((delta, c.num_samples, c.staleness))

    def apply(self, weights: NDArrays, eta: float, scratch: list[NDArray] | None,
              optimizer: ServerOptimizer | None = None) -> list[NDArray]:
        """``w += eta * median`` (or trimmed mean) of the kept deltas, through ``optimizer``
        (plain by default); empty the buffer. Returns the scratch buffers it used (reused on
        the next apply)."""
        deltas = [d for d, _, _ in self.kept]
        for d in deltas:  # a restored buffer was never checked against these weights
            _check_shapes(weights, d, "buffered delta")
        out = _buffers_like(scratch, weights)
        if self.aggregation == "median":
            robust.coordinate_median(deltas, out=out)
        else:
            robust.trimmed_mean(deltas, self.trim_fraction, out=out)
        (optimizer or Plain()).step(weights, out, eta)
        self.kept.clear()
        return out
