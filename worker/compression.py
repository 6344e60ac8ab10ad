"""A party's delta compression with error feedback (numpy only).

A lossy encoding drops something from every delta: top-k most of it, int8 and float16 the
rounding. Dropped for good, the small coordinates of top-k never reach the global model,
and training stalls. Error feedback (Seide et al. 2014; Stich et al. 2018, "Sparsified SGD
with memory") keeps what was dropped as a residual and adds it to the next delta before
compressing, so every coordinate is sent eventually: the sum of what the aggregator
received equals the sum of the true deltas minus the current residual, which stays bounded.

It runs after the privacy filter: the residual is computed from the privatised deltas
only, so it is post-processing and spends no privacy budget.
"""

from __future__ import annotations

import logging

import numpy as np

from messages.errors import ConfigError
from messages.types import NDArray, Tensors
from messages.wire.compression import DEFAULT_TOPK_FRACTION, ENCODINGS, Packed, pack

log = logging.getLogger("dfl.worker")


class DeltaCompressor:
    """Encodes each outgoing delta and carries what the encoding lost into the next one.

    >>> c = DeltaCompressor("topk", topk_fraction=0.01)
    >>> packed, sent = c.compress({"dense/kernel": delta})  # send packed; sent is what
    ...                                                     # the aggregator will decode
    """

    def __init__(self, encoding: str, topk_fraction: float = DEFAULT_TOPK_FRACTION, *,
                 error_feedback: bool = True) -> None:
        if encoding not in ENCODINGS:
            raise ConfigError(f"--encoding {encoding!r}: one of {', '.join(ENCODINGS)}")
        if not 0 < topk_fraction <= 1:
            raise ConfigError(f"--topk-fraction {topk_fraction!r}: must be in (0, 1]")
        self.encoding = encoding
        self.topk_fraction = topk_fraction
        # float32 loses nothing, so there is nothing to feed back
        self.error_feedback = error_feedback and encoding != "float32"
        self.residual: dict[str, NDArray] = {}

    def compress(self, tensors: Tensors) -> tuple[dict[str, Packed], Tensors]:
        """The packed tensors to send, and the float32 tensors they decode to.

        With error feedback, each tensor's residual is added before packing and replaced
        by what this packing lost. A residual that is not finite (a delta that diverged) is
        dropped rather than poisoning every later update.
        """
        packed: dict[str, Packed] = {}
        sent: Tensors = {}
        for name, delta in tensors.items():
            x = np.asarray(delta, dtype=np.float32)
            residual = self.residual.get(name)
            if residual is not None and residual.shape == x.shape:
                x = x + residual
            p = pack(x, self.encoding, self.topk_fraction)
            packed[name] = p
            sent[name] = p.dense()
            if self.error_feedback:
                lost = np.subtract(x, sent[name], dtype=np.float32)
                if np.isfinite(lost).all():
                    self.residual[name] = lost
                else:
                    log.warning("delta tensor %r is not finite: its residual is dropped", name)
                    self.residual.pop(name, None)
        return packed, sent

    def residual_norm(self) -> float:
        """L2 norm of everything not sent yet (over all tensors), for logs and tests."""
        return float(np.sqrt(sum(float(np.dot(r.ravel(), r.ravel()))
                                 for r in self.residual.values())))
