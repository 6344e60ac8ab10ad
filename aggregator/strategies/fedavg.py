"""Synchronous FedAvg (McMahan et al. 2017), the baseline."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from aggregator.strategies.base import (
    Contribution,
    Outcome,
    Strategy,
    _buffers_like,
    _check_name,
    _check_shapes,
    _load_optimizer,
)
from aggregator.strategies.optimizers import Plain, ServerOptimizer
from messages.errors import ConfigError
from messages.types import NDArray, NDArrays


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

    def __init__(self, eta: float = 1.0, optimizer: ServerOptimizer | None = None) -> None:
        if not (isinstance(eta, int | float) and math.isfinite(eta) and eta > 0):
            raise ConfigError(f"fedavg eta must be a finite number > 0, got {eta!r}")
        self.eta = float(eta)
        self.optimizer = optimizer or Plain()
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
            coef = n / total
            for a, d, tmp in zip(acc, delta, scratch, strict=True):
                np.multiply(d, coef, out=tmp)
                np.add(a, tmp, out=a)
        self.optimizer.step(weights, acc, self.eta)
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
            "optimizer": self.optimizer.state(),
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
        _load_optimizer(self.optimizer, state)
