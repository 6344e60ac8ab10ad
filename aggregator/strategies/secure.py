"""FedBuff over masked updates: the leader's side of secure aggregation (pure, no I/O).

Each contribution is a masked delta (``uint32`` words, ``q(delta) + mask mod 2^32``) with its
sealed seed. The leader cannot read one, and needs none: it buffers ``k`` of them from ``k``
distinct parties, gives each an integer weight (``messages.secagg.quantize.integer_weights``:
the FedBuff weight ``n * S(s)``, scaled so the largest in the buffer is ``max_weight``, with
the staleness ``s`` an update has when its buffer is full, not when it arrived: an update of
a fast party may wait in a later buffer for the others, and the versions applied meanwhile
count against it),
and asks the helper for the weighted sum of their masks. With the answer it computes
``sum w_i masked_i - sum w_i mask_i = sum w_i q(delta_i)`` modulo 2^32, which the head room
of ``scale`` makes exact, dequantizes, divides by ``sum w_i`` and applies ``eta`` times that
weighted mean, as FedBuff's mean mode does.

So the strategy never applies on ``offer``. A full buffer becomes a numbered request
(``take_requests``); the service sends it, and the helper's answer completes it
(``unmask``: ``APPLIED``) or is a refusal (``refused``: the buffer is dropped, never applied
unmasked). Buffers fill while earlier ones wait: an update goes to the oldest open buffer
that lacks its party (the helper refuses a set with a party twice); past ``max_open`` open
buffers (default 2: one fast party ahead of the rest) an update is ``DISCARDED``, since it
would wait for the slower parties and grow stale.

What cannot be done on masked values is refused at construction, with the reason: robust
aggregation (a median of masked words is noise) and norm checks (``Clipped``); the parties
clip to ``clip`` themselves, which the head room assumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from aggregator.staleness import StalenessFn
from aggregator.strategies.base import (
    Contribution,
    Outcome,
    Strategy,
    _check_name,
    _check_shapes,
    _load_optimizer,
)
from aggregator.strategies.optimizers import Plain, ServerOptimizer, staleness_scaled
from messages.errors import ConfigError
from messages.secagg import masks
from messages.secagg.quantize import dequantize, integer_weights, scale_for
from messages.types import NDArray, NDArrays
from messages.wire.kinds import MaskRequest

MIN_BUFFER = 3
"""The helper's default: it answers only for sets of at least this many distinct parties."""


@dataclass
class Slot:
    """One masked update in a buffer."""

    party: str
    seq: int
    weight: float
    masked: NDArrays
    sealed: bytes
    signature: bytes
    staleness: int = 0
    """Versions between its base and the model when it arrived."""
    samples: int = 1
    applied_at: int = 0
    """How many buffers the strategy had applied when it arrived."""


@dataclass
class Buffer:
    """Up to ``k`` slots of distinct parties; ``request`` is set once it was asked for, with
    the integer weights it was asked with."""

    slots: list[Slot] = field(default_factory=list)
    request: int | None = None
    weights: list[int] = field(default_factory=list)
    staleness: int = 0
    """The largest staleness in the buffer when it was asked for (FADAS's step)."""

    def takes(self, party: str, k: int) -> bool:
        return self.request is None and len(self.slots) < k and all(
            s.party != party for s in self.slots)


class SecureFedBuff(Strategy):
    """FedBuff's weighted mean over masked updates (see the module docstring).

    ``clip`` and ``max_weight`` fix the fixed-point ``scale`` (``scale_for``), which the
    parties receive in their welcome; ``k >= MIN_BUFFER``.
    """

    name: ClassVar[str] = "secure-fedbuff"

    def __init__(self, staleness: StalenessFn, k: int, eta: float, clip: float,
                 max_weight: int = 16, max_open: int = 2,
                 optimizer: ServerOptimizer | None = None,
                 staleness_threshold: int | None = None) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < MIN_BUFFER:
            raise ConfigError(f"secure aggregation needs --buffer-k >= {MIN_BUFFER}: the helper "
                              f"answers only for sets of at least {MIN_BUFFER} parties, got {k}")
        if not (math.isfinite(eta) and eta > 0):
            raise ConfigError(f"fedbuff eta must be a finite number > 0, got {eta!r}")
        self.staleness, self.k, self.eta = staleness, k, float(eta)
        self.clip, self.max_weight, self.max_open = float(clip), max_weight, max_open
        self.scale = scale_for(self.clip, k, max_weight)
        self.buffers: list[Buffer] = []
        self.next_request = 0
        self.applied = 0  # buffers applied: the versions this strategy made
        self.optimizer = optimizer or Plain()
        self.staleness_threshold = staleness_threshold

    @property
    def pending(self) -> list[Buffer]:
        """Buffers asked for and not yet answered, oldest first."""
        return [b for b in self.buffers if b.request is not None]

    @property
    def count(self) -> int:
        """Updates held in buffers (open and pending)."""
        return sum(len(b.slots) for b in self.buffers)

    def offer(self, weights: NDArrays, c: Contribution) -> Outcome:
        """Buffer a masked contribution; ``BUFFERED`` or ``DISCARDED``, never ``APPLIED``."""
        if c.sealed is None:
            raise ValueError(f"an unmasked delta from {c.party!r} offered to secure aggregation")
        _check_shapes(weights, c.delta, f"masked delta from {c.party!r}")
        if any(d.dtype != np.uint32 for d in c.delta):
            raise ValueError(f"masked delta from {c.party!r} is not uint32")
        weight = c.num_samples * float(self.staleness(c.staleness))
        if not (math.isfinite(weight) and weight > 0):
            return Outcome.DISCARDED
        target = next((b for b in self.buffers if b.takes(c.party, self.k)), None)
        if target is None:
            if sum(1 for b in self.buffers
                   if b.request is None and len(b.slots) < self.k) >= self.max_open:
                return Outcome.DISCARDED
            target = Buffer()
            self.buffers.append(target)
        target.slots.append(Slot(c.party, c.sealed.seq, weight, list(c.delta), c.sealed.sealed,
                                 c.sealed.signature, c.staleness, c.num_samples,
                                 self.applied))
        return Outcome.BUFFERED

    def take_requests(self) -> list[MaskRequest]:
        """Number every full buffer not yet asked for and return its request (a state change:
        checkpoint it before sending, so a restart asks for the same sets)."""
        out = []
        for b in self.buffers:
            if b.request is None and len(b.slots) >= self.k:
                b.request, self.next_request = self.next_request, self.next_request + 1
                now = [s.staleness + self.applied - s.applied_at for s in b.slots]
                b.staleness = max(now)
                b.weights = integer_weights(
                    [s.samples * max(float(self.staleness(t)), 1e-12)
                     for s, t in zip(b.slots, now, strict=True)], self.max_weight)
                out.append(self.request_of(b))
        return out

    def request_of(self, b: Buffer) -> MaskRequest:
        """The helper request of a numbered buffer (the same every time it is asked)."""
        assert b.request is not None
        length = sum(int(a.size) for a in b.slots[0].masked)
        return MaskRequest(b.request, [s.party for s in b.slots], [s.seq for s in b.slots],
                           list(b.weights), [s.sealed for s in b.slots],
                           [s.signature for s in b.slots], length)

    def _find(self, request: int) -> Buffer | None:
        return next((b for b in self.buffers if b.request == request), None)

    def unmask(self, weights: NDArrays, request: int, mask_sum: NDArray) -> Outcome:
        """Apply buffer ``request`` with the helper's sum of its masks: ``APPLIED``; or
        ``DISCARDED`` when no such buffer waits (an answer already used). ``ValueError`` when
        the sum has the wrong length (nothing is changed then)."""
        b = self._find(request)
        if b is None:
            return Outcome.DISCARDED
        flat = np.asarray(mask_sum).reshape(-1)
        if flat.dtype != np.uint32 or flat.size != sum(int(w.size) for w in weights):
            raise ValueError(f"the helper's sum for request {request} has {flat.size} "
                             f"{flat.dtype} words, the model {sum(w.size for w in weights)}")
        total_weight = sum(b.weights)
        offset = 0
        means = []
        for i, w in enumerate(weights):
            n = int(w.size)
            total = masks.weighted_sum([s.masked[i].reshape(-1) for s in b.slots], b.weights)
            total -= flat[offset:offset + n]
            means.append(dequantize(total, self.scale, total_weight).reshape(w.shape))
            offset += n
        lr = staleness_scaled(self.eta, b.staleness, self.staleness_threshold)
        self.optimizer.step(weights, means, lr)
        self.buffers.remove(b)
        self.applied += 1
        return Outcome.APPLIED

    def refused(self, request: int) -> list[tuple[str, int]]:
        """Drop buffer ``request`` (the helper will never answer it); its ``(party, seq)``."""
        b = self._find(request)
        if b is None:
            return []
        self.buffers.remove(b)
        return [(s.party, s.seq) for s in b.slots]

    def state(self) -> dict[str, Any]:
        """Every buffer with its slots (masked arrays by reference: they are read-only),
        request numbers and integer weights, and the next request number."""
        return {
            "strategy": self.name, "next_request": self.next_request, "applied": self.applied,
            "count": self.count,
            "buffers": [{"request": -1 if b.request is None else b.request,
                         "weights": list(b.weights), "staleness": b.staleness,
                         "slots": [{"party": s.party, "seq": s.seq, "weight": s.weight,
                                    "masked": list(s.masked), "sealed": s.sealed,
                                    "signature": s.signature, "staleness": s.staleness,
                                    "samples": s.samples, "applied_at": s.applied_at}
                                   for s in b.slots]}
                        for b in self.buffers],
            "optimizer": self.optimizer.state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        _check_name(state, self.name)
        self.next_request = int(state["next_request"])
        self.applied = int(state["applied"])
        self.buffers = [
            Buffer([Slot(str(s["party"]), int(s["seq"]), float(s["weight"]),
                         [np.asarray(a) for a in s["masked"]], bytes(s["sealed"]),
                         bytes(s["signature"]), int(s["staleness"]), int(s["samples"]),
                         int(s["applied_at"]))
                    for s in b["slots"]],
                   None if int(b["request"]) < 0 else int(b["request"]),
                   [int(w) for w in b["weights"]], int(b["staleness"]))
            for b in state["buffers"]]
        _load_optimizer(self.optimizer, state)
