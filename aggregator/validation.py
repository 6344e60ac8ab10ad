"""Whether a decoded update may be applied to the current global model (pure, no I/O).

The codec already checked the message's own structure; this checks it against the
federation: a known party, the model's tensor names, dtypes and shapes, a base version that
exists, bounded staleness. A replayed ``(party, seq)`` is not an error: it is reported as
``None`` so the caller counts it as a duplicate and drops it.
"""

from __future__ import annotations

from collections.abc import Container, Mapping

import numpy as np

from messages.errors import InvalidMessage
from messages.kinds import Message, Update
from messages.types import NDArray, TensorSpec


def check_update(msg: Message, *, parties: Container[str], spec: TensorSpec, version: int,
                 max_staleness: int, last_seq: Mapping[str, int],
                 max_abs: float = float("inf")) -> Update | None:
    """The update if it may be applied, ``None`` for a duplicate; raises ``InvalidMessage``."""
    if not isinstance(msg, Update):
        raise InvalidMessage("wrong-queue", f"{msg.KIND} does not belong on the updates queue")
    if msg.party not in parties:
        raise InvalidMessage("unknown-party", f"party {msg.party!r} never joined")
    if msg.seq <= last_seq.get(msg.party, -1):
        return None
    if [name for name, _d, _s in spec] != list(msg.tensors):
        raise InvalidMessage("tensor-names", "the update's tensor names differ from the model's")
    for (name, dtype, shape), array in zip(spec, msg.tensors.values(), strict=True):
        if array.dtype.name != dtype:
            raise InvalidMessage("dtype-mismatch", f"{name}: {array.dtype.name}, model has {dtype}")
        if array.shape != shape:
            raise InvalidMessage("shape-mismatch", f"{name}: {array.shape}, model has {shape}")
        if not _within(array, max_abs):
            # finite but huge values would overflow the weights to inf in a few applies
            raise InvalidMessage("out-of-range", f"{name}: |value| > {max_abs:g}")
    if msg.base_version > version:
        raise InvalidMessage("future-version", f"base version {msg.base_version} > current "
                                               f"{version}")
    if version - msg.base_version > max_staleness:
        raise InvalidMessage("stale", f"staleness {version - msg.base_version} > "
                                      f"max {max_staleness}")
    return msg


def _within(array: NDArray, max_abs: float) -> bool:
    """Whether every ``|value| <= max_abs``, usually in one BLAS pass.

    No element can exceed the square root of the sum of squares, so a small enough sum
    settles it (the factor 4 covers any rounding of the float32 sum); only an update near the
    bound needs min and max (two passes, but no full-size temporary as ``np.abs`` makes).
    """
    flat = array.reshape(-1)
    if flat.dtype in (np.float32, np.float64) and float(np.dot(flat, flat)) <= max_abs**2 / 4:
        return True
    return not flat.size or max(-float(flat.min()), float(flat.max())) <= max_abs
