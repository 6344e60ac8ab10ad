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

``max_update_norm`` (FedAsync, FedBuff) scales every delta down to that global L2 norm
before it is used, so no single update moves the model further than the bound.
"""

from __future__ import annotations

import abc
import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import numpy as np

from aggregator import robust
from aggregator.staleness import StalenessFn
from messages.errors import ConfigError
from messages.types import NDArray, NDArrays

StrategyName = Literal["fedasync", "fedbuff", "fedavg"]
STRATEGIES: tuple[str, ...] = get_args(StrategyName)
"""The names :func:`make_strategy` accepts."""

Aggregation = Literal["mean", "median", "trimmed-mean"]
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
"""How :class:`FedBuff` combines a full buffer: weighted mean, coordinate-wise median or
trimmed mean."""


@dataclass(frozen=True, slots=True)
class Contribution:
    """One party's update, as a strategy sees it.

    ``delta`` is read-only to strategies, but :class:`FedAvg` keeps a reference to it until
    its round closes, so the arrays must not be changed afterwards (arrays decoded from a
    message body are immutable, which is what the aggregator passes). ``num_samples`` is the
    size of the party's training set for this update (>= 1) and ``staleness`` is
    ``current_version - base_version`` (>= 0); ``ValueError`` otherwise.
    """

    party: str
    delta: NDArrays
    num_samples: int
    staleness: int

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {self.staleness}")


class Outcome(enum.Enum):
    """What :meth:`Strategy.offer` did with a contribution."""

    APPLIED = "applied"
    """The global weights changed: bump the version and broadcast them."""
    BUFFERED = "buffered"
    """The contribution was kept for a later apply; the weights are unchanged."""
    DISCARDED = "discarded"
    """The contribution was not used (late for a sync round, a duplicate, an unknown party)."""


def _check_shapes(weights: Sequence[NDArray], delta: Sequence[NDArray], what: str) -> None:
    """``ValueError`` unless ``delta`` has one array per weight tensor, of the same shape.

    Checked explicitly because numpy broadcasting would otherwise silently accept some
    mismatches (a ``(1,)`` delta added to a ``(10,)`` weight).
    """
    if len(delta) != len(weights):
        raise ValueError(f"{what} has {len(delta)} tensors, the model has {len(weights)}")
    for i, (w, d) in enumerate(zip(weights, delta, strict=True)):
        if w.shape != d.shape:
            raise ValueError(f"{what} tensor {i} has shape {d.shape}, the model has {w.shape}")


def _buffers_like(buffers: list[NDArray] | None, weights: NDArrays) -> list[NDArray]:
    """``buffers`` if they match ``weights`` in shape and dtype, else fresh zeroed ones."""
    if buffers is not None and len(buffers) == len(weights) and all(
        b.shape == w.shape and b.dtype == w.dtype for b, w in zip(buffers, weights, strict=True)
    ):
        return buffers
    return [np.zeros(w.shape, dtype=w.dtype) for w in weights]


def _check_norm_bound(bound: float | None, who: str) -> float | None:
    """``bound`` as a float, None for no bound; ``ConfigError`` unless finite and > 0."""
    if bound is None:
        return None
    if isinstance(bound, bool) or not (
            isinstance(bound, int | float) and math.isfinite(bound) and bound > 0):
        raise ConfigError(f"{who} max_update_norm must be a finite number > 0 or None, "
                          f"got {bound!r}")
    return float(bound)


def _check_name(state: dict[str, Any], name: str) -> None:
    """``ValueError`` when ``state`` was saved by a different strategy."""
    saved = state.get("strategy")
    if saved != name:
        raise ValueError(f"state was saved by strategy {saved!r}, cannot load it into {name!r}")


class Strategy(abc.ABC):
    """Base class of the aggregation strategies."""

    name: ClassVar[str]
    """The strategy's name in :data:`STRATEGIES` (and in configuration and logs)."""

    @abc.abstractmethod
    def offer(self, weights: NDArrays, c: Contribution) -> Outcome:
        """Give the strategy one contribution; it may change ``weights`` in place.

        Returns :attr:`Outcome.APPLIED` exactly when ``weights`` changed. Raises ``ValueError``
        when the delta's shapes do not match ``weights``.
        """

    def parties_changed(self, weights: NDArrays, active: frozenset[str]) -> bool:
        """Tell the strategy the set of active parties is now ``active`` (the whole set).

        Returns True when this changed ``weights`` in place (the caller then bumps the
        version and broadcasts). Asynchronous strategies do not depend on membership, so the
        default does nothing and returns False.
        """
        del weights, active
        return False

    @abc.abstractmethod
    def state(self) -> dict[str, Any]:
        """A snapshot of everything held between applies, for a checkpoint.

        Values are ``str``, ``int``, ``float``, lists of those, lists of numpy arrays or
        lists of such lists; key ``"strategy"`` is the strategy's name. The snapshot does not
        change when the strategy goes on (buffers are copied).
        """

    @abc.abstractmethod
    def load_state(self, state: dict[str, Any]) -> None:
        """Replace what the strategy holds with a snapshot from :meth:`state`.

        Raises ``ValueError`` when the snapshot is from another strategy. The strategy's own
        options (alpha, k, eta, staleness function) are not part of the snapshot.
        """


class FedAsync(Strategy):
    """FedAsync (Xie et al. 2019) in delta form: ``w += alpha * S(s) * d`` for every update.

    Every offer is :attr:`Outcome.APPLIED`. ``alpha`` is the mixing weight in ``(0, 1]``
    (``ConfigError`` otherwise); ``staleness`` maps an update's staleness to ``S(s)``.
    With ``max_update_norm`` (a finite bound > 0, ``ConfigError`` otherwise) each delta is
    first scaled down to that global L2 norm, ``d * min(1, bound / ||d||)`` (Sun et al.
    2019): FedAsync applies every update alone, so without a bound one party's scaled
    delta moves the model as far as it likes. Holds no state between offers apart from a
    scratch buffer.
    """

    name: ClassVar[str] = "fedasync"

    def __init__(self, staleness: StalenessFn, alpha: float = 0.6,
                 max_update_norm: float | None = None) -> None:
        if not (isinstance(alpha, int | float) and 0 < alpha <= 1):
            raise ConfigError(f"fedasync alpha must be a number in (0, 1], got {alpha!r}")
        self.staleness = staleness
        self.alpha = float(alpha)
        self.max_update_norm = _check_norm_bound(max_update_norm, "fedasync")
        self._scratch: list[NDArray] | None = None

    def offer(self, weights: NDArrays, c: Contribution) -> Outcome:
        """Apply ``c`` at once: ``w += alpha * S(c.staleness) * clip(c.delta)``; always
        APPLIED."""
        _check_shapes(weights, c.delta, f"delta from {c.party!r}")
        coef = self.alpha * float(self.staleness(c.staleness))
        if self.max_update_norm is not None:  # the clip folds into the one multiply below
            coef *= robust.norm_scale(c.delta, self.max_update_norm)
        self._scratch = scratch = _buffers_like(self._scratch, weights)
        for w, d, tmp in zip(weights, c.delta, scratch, strict=True):
            np.multiply(d, coef, out=tmp)
            np.add(w, tmp, out=w)
        return Outcome.APPLIED

    def state(self) -> dict[str, Any]:
        """Only the name: FedAsync keeps nothing between offers."""
        return {"strategy": self.name}

    def load_state(self, state: dict[str, Any]) -> None:
        """Check the snapshot is FedAsync's; there is nothing else to restore."""
        _check_name(state, self.name)


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

    With ``max_update_norm`` every delta is first scaled to at most that global L2 norm (in
    mean mode the factor folds into its multiply; the robust modes keep a scaled copy).

    ``k >= 1``, ``eta > 0`` (server learning rate), ``aggregation`` one of
    :data:`AGGREGATIONS`, ``0 <= trim_fraction < 0.5``, ``max_update_norm`` None or a
    finite number > 0, else ``ConfigError``. Configurations that are the plain mean in
    disguise are refused too: a robust mode with ``k < 3`` (the median of two values is
    their mean) and a trimmed mean that trims nothing (``floor(trim_fraction * k) = 0``,
    e.g. 0.2 of 4).
    """

    name: ClassVar[str] = "fedbuff"

    def __init__(self, staleness: StalenessFn, k: int = 4, eta: float = 1.0,
                 aggregation: str = "mean", trim_fraction: float = 0.2,
                 max_update_norm: float | None = None) -> None:
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
        self.max_update_norm = _check_norm_bound(max_update_norm, "fedbuff")
        self._acc: list[NDArray] | None = None
        self._scratch: list[NDArray] | None = None
        self._weight_sum = 0.0
        self._parties: list[str] = []
        self._kept: list[tuple[NDArrays, int, int]] = []  # robust modes: delta, n, staleness

    @property
    def count(self) -> int:
        """How many contributions are in the buffer now (0 .. k-1 between offers)."""
        return len(self._parties)

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
        scale = (1.0 if self.max_update_norm is None
                 else robust.norm_scale(c.delta, self.max_update_norm))
        if self.aggregation == "mean":
            self._add_to_sum(weights, c.delta, weight, scale)
        else:
            if self._kept:
                _check_shapes(weights, self._kept[0][0], "buffered delta")  # never drop them
            delta = c.delta if scale == 1.0 else [np.multiply(d, scale) for d in c.delta]
            self._kept.append((delta, c.num_samples, c.staleness))
        self._parties.append(c.party)
        if len(self._parties) < self.k:
            return Outcome.BUFFERED
        if self.aggregation == "mean":
            self._apply_sum(weights)
        else:
            self._apply_robust(weights)
        self._parties.clear()
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
        self._scratch = scratch = _buffers_like(self._scratch, weights)
        coef = weight * scale
        for a, d, tmp in zip(acc, delta, scratch, strict=True):
            np.multiply(d, coef, out=tmp)
            np.add(a, tmp, out=a)
        self._weight_sum += weight

    def _apply_sum(self, weights: NDArrays) -> None:
        """Mean mode: ``w += eta * acc / weight_sum``; empty the running sum."""
        assert self._acc is not None
        coef = self.eta / self._weight_sum
        for w, a in zip(weights, self._acc, strict=True):
            np.multiply(a, coef, out=a)
            np.add(w, a, out=w)
            a.fill(0)
        self._weight_sum = 0.0

    def _apply_robust(self, weights: NDArrays) -> None:
        """Robust modes: ``w += eta * median`` (or trimmed mean) of the kept deltas."""
        deltas = [d for d, _, _ in self._kept]
        for d in deltas:  # a restored buffer was never checked against these weights
            _check_shapes(weights, d, "buffered delta")
        self._scratch = out = _buffers_like(self._scratch, weights)
        if self.aggregation == "median":
            robust.coordinate_median(deltas, out=out)
        else:
            robust.trimmed_mean(deltas, self.trim_fraction, out=out)
        for w, r in zip(weights, out, strict=True):
            np.multiply(r, self.eta, out=r)
            np.add(w, r, out=w)
        self._kept.clear()

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
        self._kept = kept if self.aggregation != "mean" else []

    def _sum_of(self, kept: list[tuple[NDArrays, int, int]]) -> tuple[list[NDArray], float]:
        """The running sum and weight sum mean mode would hold after ``kept``, in order."""
        acc = [np.zeros(np.shape(t), dtype=np.float32) for t in kept[0][0]]
        total = 0.0
        for delta, n, s in kept:
            weight = n * float(self.staleness(s))
            for a, d in zip(acc, delta, strict=True):
                np.add(a, np.multiply(d, weight, dtype=np.float32), out=a)
            total += weight
        return acc, total


class FedAvg(Strategy):
    """Synchronous FedAvg (McMahan et al. 2017), the baseline the async strategies beat.

    A round is open on the current global version. Its *participants* are the parties that
    were active when it opened; it waits for one contribution with staleness 0 from each of
    them, then applies ``w += eta * sum(n_k d_k) / sum(n_k)`` (:attr:`Outcome.APPLIED`) and
    the next round opens with the parties active at that moment. Earlier contributions of
    the round are :attr:`Outcome.BUFFERED`. :attr:`Outcome.DISCARDED` are: a stale
    contribution (staleness > 0, trained on an older version), a second one from a party
    already in the round, and one from a party that is not a participant (unknown, departed,
    or joined after the round opened).

    Membership comes from :meth:`parties_changed` (the active set starts empty):

    * a participant that leaves no longer blocks the round and its contribution, if any, is
      dropped; when everyone remaining has contributed the round completes right there
      (weights change, the call returns True);
    * a party that joins mid-round is waited for from the next round on;
    * while a round has no participants (at start, or after everyone left) it opens anew on
      each membership change, with the then active parties as its participants.

    The round keeps a reference to each accepted delta (not a copy) until it closes, so
    contributions can be dropped exactly when their party leaves. ``eta > 0`` (server
    learning rate), else ``ConfigError``.
    """

    name: ClassVar[str] = "fedavg"

    def __init__(self, eta: float = 1.0) -> None:
        if not (isinstance(eta, int | float) and math.isfinite(eta) and eta > 0):
            raise ConfigError(f"fedavg eta must be a finite number > 0, got {eta!r}")
        self.eta = float(eta)
        self._active: frozenset[str] = frozenset()
        self._participants: set[str] = set()
        self._received: dict[str, tuple[NDArrays, int]] = {}
        self._acc: list[NDArray] | None = None
        self._scratch: list[NDArray] | None = None

    @property
    def active(self) -> frozenset[str]:
        """The active parties, as last given to :meth:`parties_changed`."""
        return self._active

    @property
    def waiting_for(self) -> frozenset[str]:
        """The participants of the open round that have not contributed yet."""
        return frozenset(self._participants - self._received.keys())

    def offer(self, weights: NDArrays, c: Contribution) -> Outcome:
        """Accept ``c`` into the open round if it is fresh, first, and from a participant;
        complete the round (APPLIED) when it was the last one missing."""
        _check_shapes(weights, c.delta, f"delta from {c.party!r}")
        if c.staleness > 0 or c.party not in self._participants or c.party in self._received:
            return Outcome.DISCARDED
        self._received[c.party] = (c.delta, c.num_samples)
        if self._participants <= self._received.keys():
            self._complete(weights)
            return Outcome.APPLIED
        return Outcome.BUFFERED

    def parties_changed(self, weights: NDArrays, active: frozenset[str]) -> bool:
        """Make ``active`` the active set; True when that completed the open round."""
        self._active = frozenset(active)
        if not self._participants:
            self._participants = set(self._active)
            return False
        self._participants &= self._active
        for party in list(self._received):
            if party not in self._participants:
                del self._received[party]
        if self._participants <= self._received.keys():
            if self._received:
                self._complete(weights)
                return True
            self._participants = set(self._active)  # everyone left: reopen empty
        return False

    def _complete(self, weights: NDArrays) -> None:
        """Apply the round's weighted mean to ``weights`` and open the next round."""
        total = sum(n for _, n in self._received.values())
        self._acc = acc = _buffers_like(self._acc, weights)
        self._scratch = scratch = _buffers_like(self._scratch, weights)
        for a in acc:
            a.fill(0)
        for delta, n in self._received.values():
            _check_shapes(weights, delta, "round delta")  # weights swapped mid-round
            coef = self.eta * n / total
            for a, d, tmp in zip(acc, delta, scratch, strict=True):
                np.multiply(d, coef, out=tmp)
                np.add(a, tmp, out=a)
        for w, a in zip(weights, acc, strict=True):
            np.add(w, a, out=w)
        self._received.clear()
        self._participants = set(self._active)

    def state(self) -> dict[str, Any]:
        """``active`` and ``participants`` (sorted), and the round's accepted contributions
        in arrival order: ``parties``, ``num_samples`` and ``deltas`` (one list of arrays
        per party)."""
        return {
            "strategy": self.name,
            "active": sorted(self._active),
            "participants": sorted(self._participants),
            "parties": list(self._received),
            "num_samples": [n for _, n in self._received.values()],
            "deltas": [list(d) for d, _ in self._received.values()],
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore the active set and the open round. ``ValueError`` for a snapshot whose
        lists disagree in length or whose contributions come from non-participants."""
        _check_name(state, self.name)
        parties = [str(p) for p in state["parties"]]
        counts = [int(n) for n in state["num_samples"]]
        deltas = [[np.asarray(a) for a in d] for d in state["deltas"]]
        if not len(parties) == len(counts) == len(deltas):
            raise ValueError("fedavg state: parties, num_samples and deltas differ in length")
        participants = {str(p) for p in state["participants"]}
        if not set(parties) <= participants:
            raise ValueError("fedavg state: contributions from parties outside the round")
        self._active = frozenset(str(p) for p in state["active"])
        self._participants = participants
        self._received = dict(zip(parties, zip(deltas, counts, strict=True), strict=True))


def make_strategy(
    name: str, *, staleness: StalenessFn, alpha: float, k: int, eta: float,
    aggregation: str = "mean", trim_fraction: float = 0.2,
    max_update_norm: float | None = None,
) -> Strategy:
    """Build the strategy called ``name`` (one of :data:`STRATEGIES`) from the options.

    Each strategy takes the options it uses and ignores the rest: fedasync ``staleness``,
    ``alpha`` and ``max_update_norm``; fedbuff ``staleness``, ``k``, ``eta``,
    ``aggregation``, ``trim_fraction`` and ``max_update_norm``; fedavg ``eta``. The robustness
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
    if name == "fedasync":
        return FedAsync(staleness, alpha=alpha, max_update_norm=max_update_norm)
    if name == "fedbuff":
        return FedBuff(staleness, k=k, eta=eta, aggregation=aggregation,
                       trim_fraction=trim_fraction, max_update_norm=max_update_norm)
    return FedAvg(eta=eta)
