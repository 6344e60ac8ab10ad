"""Whether a decoded update may be applied to the current global model (pure, no I/O).

The codec already checked the message's own structure; this checks it against the
federation: a known party, the model's tensor names, dtypes and shapes, a base version that
exists, bounded staleness. A replayed ``(party, seq)`` is not an error: it is reported as
``None`` so the caller counts it as a duplicate and drops it.
"""

from __future__ import annotations

from collections.abc import Container, Mapping

import numpy as np

from aggregator.dedupe import AppliedSeqs
from messages.errors import InvalidMessage
from messages.types import NDArray, TensorSpec
from messages.wire.bounds import SEQ_AHEAD, SEQ_RANGE
from messages.wire.codec import all_finite
from messages.wire.kinds import Message, Update


def check_update(msg: Message, *, parties: Container[str], spec: TensorSpec, version: int,
                 max_staleness: int, applied: AppliedSeqs,
                 granted: Mapping[str, int] | None = None,
                 max_abs: float = float("inf"), masked: bool = False) -> Update | None:
    """The update if it may be applied, ``None`` for a duplicate; raises ``InvalidMessage``.

    ``applied`` says which seqs the state holds (exact in any delivery order, see
    ``aggregator.dedupe``). ``granted`` maps each party to the incarnation of its last join
    (its seq range, see ``seq_window``); without it (tests of other checks) any seq is in
    range. ``masked``
    (secure aggregation): the update must be masked ``uint32`` words with a sealed seed
    (``unmasked`` otherwise: never take a delta in the clear), and ``max_abs`` cannot apply;
    without it a masked update is refused (``unexpected-mask``).
    """
    if not isinstance(msg, Update):
        raise InvalidMessage("wrong-queue", f"{msg.KIND} does not belong on the updates queue")
    if msg.party not in parties:
        raise InvalidMessage("unknown-party", f"party {msg.party!r} never joined")
    if granted is not None:
        lo, hi = seq_window(granted.get(msg.party, 0), applied.last(msg.party))
        if not lo <= msg.seq < hi:
            raise InvalidMessage("bad-seq", f"seq {msg.seq} of {msg.party} is outside "
                                            f"{lo}..{hi - 1}, the range its last join granted")
    if applied.holds(msg.party, msg.seq):
        return None
    if masked and not msg.sealed_seed:
        raise InvalidMessage("unmasked", "this federation runs secure aggregation: an update "
                                         "must be masked, with its seed sealed to the helper")
    if not masked and (msg.sealed_seed or msg.seed_signature):
        raise InvalidMessage("unexpected-mask", "a masked update, but this aggregator does not "
                                                "run secure aggregation")
    if [name for name, _d, _s in spec] != list(msg.tensors):
        raise InvalidMessage("tensor-names", "the update's tensor names differ from the model's")
    for (name, model_dtype, shape), array in zip(spec, msg.tensors.values(), strict=True):
        dtype = "uint32" if masked else model_dtype
        if array.dtype.name != dtype:
            raise InvalidMessage("dtype-mismatch", f"{name}: {array.dtype.name}, model has {dtype}")
        if array.shape != shape:
            raise InvalidMessage("shape-mismatch", f"{name}: {array.shape}, model has {shape}")
        if not masked:
            problem = _values(array, max_abs)
            if problem == "non-finite":
                raise InvalidMessage("non-finite", f"tensor {name!r} holds NaN or Inf")
            if problem:
                # finite but huge values would overflow the weights to inf in a few applies
                raise InvalidMessage("out-of-range", f"{name}: |value| > {max_abs:g}")
    if msg.base_version > version:
        raise InvalidMessage("future-version", f"base version {msg.base_version} > current "
                                               f"{version}")
    if version - msg.base_version > max_staleness:
        raise InvalidMessage("stale", f"staleness {version - msg.base_version} > "
                                      f"max {max_staleness}")
    return msg


def seq_window(incarnation: int, last_seq: int) -> tuple[int, int]:
    """The seqs ``[lo, hi)`` an update of a party may carry.

    A join of incarnation ``i`` grants the range ``[i * SEQ_RANGE, (i + 1) * SEQ_RANGE)``;
    updates the party sent in its previous incarnation may still be queued, so that range is
    accepted too. Within it a seq may run at most ``SEQ_AHEAD`` past the last one applied (or
    the range's start): parties count up by one, and an update with a forged far-ahead seq
    would otherwise make every later update of the real party a "duplicate".
    """
    start = incarnation * SEQ_RANGE
    hi = min(start + SEQ_RANGE, max(last_seq + 1, start) + SEQ_AHEAD)
    return max(0, start - SEQ_RANGE), hi


def _values(array: NDArray, max_abs: float) -> str | None:
    """``None`` when every value is finite with ``|value| <= max_abs``, else
    ``"non-finite"`` or ``"out-of-range"``: usually one BLAS pass, no temporary.

    A NaN or infinite element makes the sum of squares NaN or infinite, and no element can
    exceed its square root, so a small finite sum settles both checks at once (the factor 4
    covers any rounding of the float32 sum). Otherwise the exact checks decide: an update
    near the bound, or a bad one, costs more passes, an honest one never does. Updates are
    decoded without the codec's own finite check (``decode(..., finite=False)``), so this is
    the one pass over each delta before it is applied.
    """
    flat = array.reshape(-1)
    if flat.dtype in (np.float32, np.float64):
        squares = float(np.dot(flat, flat))
        if squares <= max_abs**2 / 4:  # False for NaN
            return None
        if not all_finite(flat):
            return "non-finite"
    elif flat.dtype.kind == "f" and not np.isfinite(flat).all():
        return "non-finite"
    if flat.size and max(-float(flat.min()), float(flat.max())) > max_abs:
        return "out-of-range"
    return None
