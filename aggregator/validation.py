"""Whether a decoded update may be applied to the current global model (pure, no I/O).

The codec already checked the message's own structure; this checks it against the
federation: a known party, the model's tensor names, dtypes and shapes, a base version that
exists, bounded staleness. A replayed ``(party, seq)`` is not an error: it is reported as
``None`` so the caller counts it as a duplicate and drops it.
"""

from __future__ import annotations

from collections.abc import Container, Mapping

from messages.errors import InvalidMessage
from messages.kinds import Message, Update
from messages.types import TensorSpec


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
        # min and max read the array without the full-size temporary np.abs would make
        if array.size and max(-float(array.min()), float(array.max())) > max_abs:
            # finite but huge values would overflow the weights to inf in a few applies
            raise InvalidMessage("out-of-range", f"{name}: |value| > {max_abs:g}")
    if msg.base_version > version:
        raise InvalidMessage("future-version", f"base version {msg.base_version} > current "
                                               f"{version}")
    if version - msg.base_version > max_staleness:
        raise InvalidMessage("stale", f"staleness {version - msg.base_version} > "
                                      f"max {max_staleness}")
    return msg
