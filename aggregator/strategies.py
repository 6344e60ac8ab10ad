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
  sum, then ``w += eta * sum(n_k S(s_k) d_k) / sum(n_k S(s_k))``.
* :class:`FedAvg` (McMahan et al. 2017), the synchronous baseline: a round waits for one
  fresh update from every participating party, then ``w += eta * sum(n_k d_k) / sum(n_k)``.

Hot paths use preallocated buffers (``np.multiply(..., out=...)``, ``np.add(..., out=...)``),
allocated on first use with the shapes and dtype of ``weights``, so applying an update makes
no model-sized temporaries. A strategy is not thread-safe: call it from one thread.

:meth:`Strategy.state` and :meth:`Strategy.load_state` checkpoint whatever a strategy holds
between applies (FedBuff's buffer, FedAvg's round); restoring into a strategy built with the
same options continues exactly as the original would have.
"""

from __future__ import annotations

import abc
import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from aggregator.staleness import StalenessFn
from messages.errors import ConfigError
from messages.types import NDArray, NDArrays

STRATEGIES = ("fedasync", "fedbuff", "fedavg")
"""The names :func:`make_strategy` accepts."""


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
    Holds no state between offers apart from a scratch buffer.
    """

    name: ClassVar[str] = "fedasync"

    def __init__(self, staleness: StalenessFn, alpha: float = 0.6) -> None:
        if not (isinstance(alpha, int | float) and 0 < alpha <= 1):
            raise ConfigError(f"fedasync alpha must be a number in (0, 1], got {alpha!r}")
        self.staleness = staleness
        self.alpha = float(alpha)
        self._scratch: list[NDArray] | None = None

    def offer(self, weights: NDArrays, c: Contribution) -> Outcome:
        """Apply ``c`` at once: ``w += alpha * S(c.staleness) * c.delta``; always APPLIED."""
        _check_shapes(weights, c.delta, f"delta from {c.party!r}")
        coef = self.alpha * float(self.staleness(c.staleness))
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

    Each contribution adds ``n * S(s) * d`` to a running sum (one accumulator per tensor, in
    the weights' dtype) and ``n * S(s)`` to a scalar weight sum; deltas themselves are not
    kept. Offers 1 .. k-1 of a buffer are :attr:`Outcome.BUFFERED`; the k-th applies
    ``w += eta * sum / weight_sum``, empties the buffer and is :attr:`Outcome.APPLIED`.
    The same party may appear more than once in a buffer. A contribution whose weight
    ``n * S(s)`` is not a positive finite number (``S`` underflowed to 0) carries no
    information and is :attr:`Outcome.DISCARDED` without entering the buffer.

    ``k >= 1`` and ``eta > 0`` (server learning rate), else ``ConfigError``.
    """

    name: ClassVar[str] = "fedbuff"

    def __init__(self, staleness: StalenessFn, k: int = 4, eta: float = 1.0) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"fedbuff k must be an integer >= 1, got {k!r}")
        if not (isinstance(eta, int | float) and math.isfinite(eta) and eta > 0):
            raise ConfigError(f"fedbuff eta must be a finite number > 0, got {eta!r}")
        self.staleness = staleness
        self.k = k
        self.eta = float(eta)
        self._acc: list[NDArray] | None = None
        self._scratch: list[NDArray] | None = None
        self._weight_sum = 0.0
        self._parties: list[str] = []

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
        acc = self._acc
        if acc is None or not self._parties:
            acc = _buffers_like(acc, weights)  # empty buffer: (re)allocate freely
        else:
            _check_shapes(weights, acc, "buffered sum")  # never drop a non-empty buffer
        self._acc = acc
        self._scratch = scratch = _buffers_like(self._scratch, weights)
        for a, d, tmp in zip(acc, c.delta, scratch, strict=True):
            np.multiply(d, weight, out=tmp)
            np.add(a, tmp, out=a)
        self._weight_sum += weight
        self._parties.append(c.party)
        if len(self._parties) < self.k:
            return Outcome.BUFFERED
        coef = self.eta / self._weight_sum
        for w, a in zip(weights, acc, strict=True):
            np.multiply(a, coef, out=a)
            np.add(w, a, out=w)
            a.fill(0)
        self._weight_sum = 0.0
        self._parties.clear()
        return Outcome.APPLIED

    def state(self) -> dict[str, Any]:
        """``accumulator`` (copies; empty list before the first offer), ``weight_sum``,
        ``count`` and ``parties`` (arrival order)."""
        return {
            "strategy": self.name,
            "accumulator": [] if self._acc is None else [a.copy() for a in self._acc],
            "weight_sum": self._weight_sum,
            "count": len(self._parties),
            "parties": list(self._parties),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore the buffer. A buffer holding ``k`` or more (saved with a larger ``k``) is
        applied by the next offer. ``ValueError`` for a snapshot that is inconsistent."""
        _check_name(state, self.name)
        parties = [str(p) for p in state["parties"]]
        if int(state["count"]) != len(parties):
            raise ValueError(f"fedbuff state: count {state['count']} but {len(parties)} parties")
        acc = [np.array(a, dtype=np.float32, copy=True) for a in state["accumulator"]]
        if parties and not acc:
            raise ValueError("fedbuff state: buffered parties but no accumulator")
        self._acc = acc or None
        self._weight_sum = float(state["weight_sum"])
        self._parties = parties


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
    name: str, *, staleness: StalenessFn, alpha: float, k: int, eta: float
) -> Strategy:
    """Build the strategy called ``name`` (one of :data:`STRATEGIES`) from the options.

    Each strategy takes the options it uses and ignores the rest: fedasync ``staleness`` and
    ``alpha``; fedbuff ``staleness``, ``k`` and ``eta``; fedavg ``eta``. ``ConfigError`` for
    an unknown name or an out-of-range option of the chosen strategy.
    """
    if name == "fedasync":
        return FedAsync(staleness, alpha=alpha)
    if name == "fedbuff":
        return FedBuff(staleness, k=k, eta=eta)
    if name == "fedavg":
        return FedAvg(eta=eta)
    raise ConfigError(f"unknown strategy {name!r}; allowed: {', '.join(STRATEGIES)}")
