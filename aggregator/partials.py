"""Edge aggregation's pure parts: a partial FedBuff sum of several updates, and the root's
verdict on the members of one (no I/O; ``aggregator.edge`` and the root's service do that).

The handshake between an edge and the root (docs/scale.md):

1. Edges compete for ``F.updates``. Each validates an update as the aggregator does, keeps
   it unacked with its decoded delta (a ``Member``), and every ``--edge-k`` updates (or
   ``--edge-flush-seconds``) sends one ``Partial`` to ``F.partials``: the weighted sum of the
   members' deltas and each member's ``(party, seq)``.
2. The root checks every member against its own state (``refusals``): membership, the seq
   window of the party's last join, the duplicate check, staleness against its version. All
   new and valid: it applies the sum as FedBuff applies updates, and answers ``accepted``
   once a checkpoint holds it. All already held: ``accepted`` too, nothing applied (an
   answer was lost and the edge asked again, or another edge's partial held them). Anything
   else: nothing is applied, and the answer names the members it cannot take and why.
3. The edge acks a member's update only after an ``accepted`` answer. Named members are
   settled one by one (a duplicate acked, a refused one dead-lettered with its reason), the
   others go into a new partial.

Why nothing is counted twice or lost: a partial is applied only when none of its members is
already in the root's state, and all of its members enter the state together (one
checkpoint). An update stays unacked, so in the queue, until the root's state holds it: an
edge killed at any moment returns its updates to ``F.updates``, and whichever edge gets them
next has them refused as duplicates when the root already holds them, or taken when it does
not. Exactness needs the root's duplicate check to be exact over a party's seqs in any order,
which ``aggregator.dedupe`` is within its window.
"""

from __future__ import annotations

import math
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from aggregator.dedupe import AppliedSeqs
from aggregator.staleness import StalenessFn
from aggregator.strategies.base import axpy
from aggregator.validation import seq_window
from messages.errors import InvalidMessage
from messages.types import NDArrays, TensorSpec
from messages.wire.kinds import Partial

DUPLICATE = "duplicate"
"""The reason an answer gives for a member the root's state already holds."""


@dataclass(slots=True)
class Member:
    """One update an edge holds (unacked) until the root has taken it."""

    party: str
    seq: int
    base: int
    samples: int
    delta: NDArrays
    delivery: Any
    """The broker delivery of the update, acked only once the root's state holds it."""


def build_partial(edge: str, number: int, version: int, names: Sequence[str],
                  members: Sequence[Member], staleness: StalenessFn) -> Partial:
    """The partial sum of ``members``: ``sum n * S(version - base) * delta`` and the sum of
    the weights (float32 tensors, as FedBuff's own running sum). A member's staleness is
    measured against ``version``, the newest root version the edge knows (a base newer than
    that counts as staleness 0; the root refuses a base it never made)."""
    if not members:
        raise ValueError("a partial needs at least one member")
    acc = [np.zeros(d.shape, dtype=np.float32) for d in members[0].delta]
    total = 0.0
    for m in members:
        weight = m.samples * float(staleness(max(0, version - m.base)))
        if not (math.isfinite(weight) and weight > 0):
            weight = 0.0  # S underflowed: the member is counted and carries nothing
        for a, d in zip(acc, m.delta, strict=True):
            axpy(weight, d, a)
        total += weight
    return Partial(edge, number, version, [m.party for m in members], [m.seq for m in members],
                   [m.base for m in members], [m.samples for m in members], total,
                   dict(zip(names, acc, strict=True)))


def check_partial(p: Partial, spec: TensorSpec) -> None:
    """``InvalidMessage`` unless ``p`` is well formed for a model of ``spec``: one entry per
    member in every list, at least one member, a positive weight, and a sum with the model's
    tensor names, dtypes and shapes (the codec already checked that values are finite)."""
    n = len(p.parties)
    if not n or not len(p.seqs) == len(p.bases) == len(p.samples) == n:
        raise InvalidMessage("bad-partial", f"members: {n} parties, {len(p.seqs)} seqs, "
                                            f"{len(p.bases)} bases, {len(p.samples)} samples")
    if not p.weight > 0:
        raise InvalidMessage("bad-partial", f"weight {p.weight} is not positive")
    if [name for name, _d, _s in spec] != list(p.tensors):
        raise InvalidMessage("tensor-names", "the partial's tensor names differ from the model's")
    for (name, dtype, shape), array in zip(spec, p.tensors.values(), strict=True):
        if array.dtype.name != "float32" or array.shape != shape:
            raise InvalidMessage("shape-mismatch", f"{name}: {array.dtype.name}{array.shape}, "
                                                   f"model has {dtype}{shape}")


def refusals(p: Partial, *, parties: Container[str], granted: Mapping[str, int],
             applied: AppliedSeqs, version: int, max_staleness: int) -> list[tuple[int, str]]:
    """The members (by index) the root cannot take, each with its reason: ``duplicate`` for
    one its state holds (or listed twice), else the reason the aggregator would dead-letter
    that update with. Empty: every member is new and valid."""
    out: list[tuple[int, str]] = []
    seen: set[tuple[str, int]] = set()
    for i, (party, seq, base) in enumerate(zip(p.parties, p.seqs, p.bases, strict=True)):
        if party not in parties:
            out.append((i, "unknown-party"))
            continue
        lo, hi = seq_window(granted.get(party, 0), applied.last(party))
        if not lo <= seq < hi:
            out.append((i, "bad-seq"))
        elif applied.holds(party, seq) or (party, seq) in seen:
            out.append((i, DUPLICATE))
        elif base > version:
            out.append((i, "future-version"))
        elif version - base > max_staleness:
            out.append((i, "stale"))
        seen.add((party, seq))
    return out


def all_held(p: Partial, problems: list[tuple[int, str]]) -> bool:
    """Whether ``refusals`` found every member of ``p`` already in the state: the partial is
    taken (nothing to apply), not refused."""
    return len(problems) == len(p.parties) and all(r == DUPLICATE for _i, r in problems)
