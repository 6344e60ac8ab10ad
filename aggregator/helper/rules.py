"""What the helper answers, and what it refuses (pure: no I/O, no crypto).

A leader that got two sums over sets differing in one update would learn that update: the
difference of the two unmasked sums. So the helper answers:

- only for sets of at least ``min_parties`` distinct parties (``small-set``), none twice
  (``duplicate-party``), with integer weights in ``1..max_weight`` (``bad-weight``), with
  parallel lists of one length (``bad-request``);
- only once per ``(party, seq)`` ever. Parties number their updates upwards and a leader asks
  for its buffers in order, so the helper keeps, per party, the highest seq it has answered
  for, and refuses any request naming a seq at or below it: ``reuse`` when every entry was
  answered before, ``overlap`` when some were. That is a few bytes per party, however long
  the federation runs.
- A request identical to one already answered (same number, entries, weights and length) is
  answered again: it reveals nothing new, and it is how a leader recovers a reply lost in a
  crash (of either daemon). The helper remembers the digests of its last ``REPLAYS`` answers.

Whether each sealed seed is genuine (signed by its party, sealed to this helper for that
``(party, seq)``) is checked by the service with the keys; this module sees only the entries.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from messages.wire.kinds import MaskRequest

REPLAYS = 4096
"""How many answered requests the helper can still replay (the digests it keeps)."""


class Refusal(Exception):
    """The helper will not answer this request; ``reason`` is a slug, ``detail`` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def digest(req: MaskRequest) -> str:
    """A request's identity: everything it asks for, hashed (SHA-256, hex)."""
    h = hashlib.sha256(b"dfl-mask-request/v1")
    h.update(req.request.to_bytes(8, "big") + req.length.to_bytes(8, "big"))
    for party, seq, weight, sealed, sig in zip(req.parties, req.seqs, req.weights, req.sealed,
                                               req.signatures, strict=True):
        for part in (party.encode(), seq.to_bytes(8, "big"), weight.to_bytes(4, "big"),
                     sealed, sig):
            h.update(len(part).to_bytes(4, "big") + part)
    return h.hexdigest()


@dataclass
class HelperRules:
    """The helper's memory of what it answered, and the checks against it."""

    min_parties: int = 3
    max_weight: int = 16
    answered: dict[str, int] = field(default_factory=dict)
    """Per party, the highest seq of an answered request."""
    replays: OrderedDict[str, int] = field(default_factory=OrderedDict)
    """Digests of the last ``REPLAYS`` answered requests (with their request numbers)."""

    def check(self, req: MaskRequest) -> bool:
        """``Refusal`` when ``req`` must not be answered; True when it is a replay of a request
        already answered (answer it again, record nothing), False when it is new."""
        n = len(req.parties)
        if not n == len(req.seqs) == len(req.weights) == len(req.sealed) == len(req.signatures):
            raise Refusal("bad-request", "parties, seqs, weights, sealed seeds and signatures "
                                         "differ in length")
        if len(set(req.parties)) != n:
            twice = sorted({p for p in req.parties if req.parties.count(p) > 1})
            raise Refusal("duplicate-party", f"parties {twice[:8]} appear more than once")
        if n < self.min_parties:
            raise Refusal("small-set", f"{n} parties; this helper answers only for sets of at "
                                       f"least {self.min_parties}")
        bad = [w for w in req.weights if not 1 <= w <= self.max_weight]
        if bad:
            raise Refusal("bad-weight", f"weights {bad[:8]} outside 1..{self.max_weight}")
        if digest(req) in self.replays:
            return True
        seen = [f"{p}#{s}" for p, s in zip(req.parties, req.seqs, strict=True)
                if s <= self.answered.get(p, -1)]
        if seen:
            reason = "reuse" if len(seen) == n else "overlap"
            raise Refusal(reason, f"{len(seen)} of {n} updates were in an answered set "
                                  f"({', '.join(seen[:4])}{', ...' if len(seen) > 4 else ''})")
        return False

    def record(self, req: MaskRequest) -> None:
        """Remember ``req`` as answered (call after ``check`` said it is new)."""
        for p, s in zip(req.parties, req.seqs, strict=True):
            self.answered[p] = max(s, self.answered.get(p, -1))
        self.replays[digest(req)] = req.request
        while len(self.replays) > REPLAYS:
            self.replays.popitem(last=False)

    def state(self) -> dict[str, Any]:
        """Everything to persist (plain data)."""
        return {"answered": dict(self.answered), "replays": list(self.replays.items())}

    def load_state(self, state: dict[str, Any]) -> None:
        self.answered = {str(p): int(s) for p, s in state["answered"].items()}
        self.replays = OrderedDict((str(d), int(r)) for d, r in state["replays"])
