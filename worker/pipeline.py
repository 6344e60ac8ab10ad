"""The delta pipeline: what happens to a trained delta before it is published.

Each stage takes the ``Outgoing`` update and returns it, changed: the privacy filter clips
and noises the delta and reports its epsilon; the compressor encodes it (with error
feedback) and says what the aggregator will decode. ``Worker`` builds the stages from its
settings (``stages_for``), in that order (the compressor must see privatised deltas only);
``Worker(config, delta_stages=[...])`` replaces them, e.g. to add a stage that masks the
delta for secure aggregation.

A stage must: keep ``tensors`` in model order with the same names, shapes and float32
dtype; put anything the aggregator should see in ``metrics`` (finite floats); set ``packed``
only when it encodes the tensors (and then leave ``tensors`` as what they decode to); be
quick and not touch the broker (it runs on the daemon's thread).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from messages.types import Tensors
from messages.wire.compression import Packed

if TYPE_CHECKING:
    from worker.compression import DeltaCompressor
    from worker.config import WorkerConfig
    from worker.privacy import PrivacyFilter


@dataclass(slots=True)
class Outgoing:
    """An update on its way out: the delta by tensor name, local metrics, and its encoded
    form when a stage packed it."""

    tensors: Tensors
    metrics: dict[str, float]
    packed: dict[str, Packed] | None = field(default=None)


class DeltaStage(Protocol):
    """One step of the pipeline (see the module docstring)."""

    def __call__(self, out: Outgoing) -> Outgoing: ...


class PrivacyStage:
    """Clip each delta to L2 norm C and add Gaussian noise (``worker.privacy``); the
    epsilon spent so far goes into the metrics once it is finite."""

    def __init__(self, privacy: PrivacyFilter) -> None:
        self.privacy = privacy

    def __call__(self, out: Outgoing) -> Outgoing:
        names = list(out.tensors)
        noised = self.privacy.apply([out.tensors[n] for n in names])
        out.tensors = dict(zip(names, noised, strict=True))
        epsilon = self.privacy.epsilon
        if math.isfinite(epsilon):
            out.metrics["epsilon"] = epsilon
        return out


class CompressionStage:
    """Encode the delta (float16, int8, top-k) and carry what was lost into the next one."""

    def __init__(self, compressor: DeltaCompressor) -> None:
        self.compressor = compressor

    def __call__(self, out: Outgoing) -> Outgoing:
        out.packed, out.tensors = self.compressor.compress(out.tensors)
        return out


def stages_for(config: WorkerConfig) -> list[DeltaStage]:
    """The stages a worker's settings ask for: privacy (``--dp-clip``), then compression
    (``--encoding`` other than float32)."""
    stages: list[DeltaStage] = []
    if config.dp_clip is not None:
        from worker.privacy import PrivacyFilter  # dp-accounting only when asked for

        # unseeded on purpose: noise derived from --seed could be regenerated and removed
        stages.append(PrivacyStage(PrivacyFilter(config.dp_clip, config.dp_noise,
                                                 config.dp_delta)))
    if config.encoding != "float32":
        from worker.compression import DeltaCompressor

        stages.append(CompressionStage(DeltaCompressor(config.encoding, config.topk_fraction)))
    return stages
