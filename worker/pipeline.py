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
quick and not touch the broker (it runs on the daemon's thread). The one exception to the
dtype is the last stage of secure aggregation (``MaskingStage``), which turns the delta into
masked ``uint32`` words and sets ``sealed_seed`` and ``seed_signature``; nothing may follow it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from messages.errors import FederationError
from messages.secagg import masks, sealing
from messages.secagg.quantize import clip_l2, quantize
from messages.types import Settings, Tensors
from messages.wire.compression import Packed

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    from messages.wire.signing import Signer
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
    seq: int = -1
    """The update's seq (known before the stages run)."""
    settings: Settings = field(default_factory=dict)
    """The training settings of the party's welcome."""
    sealed_seed: bytes = b""
    seed_signature: bytes = b""


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


class MaskingStage:
    """Secure aggregation (``messages.secagg``): clip the delta to the welcome's
    ``secagg_clip``, quantize it with its ``secagg_scale``, add the mask of a fresh seed
    modulo 2^32, seal the seed to the helper and sign ``(party, seq, sealed seed)``.

    The aggregator sees only the masked words; the seed leaves the party only sealed. A
    welcome without secure aggregation is refused (``FederationError``): a party configured
    to hide its deltas never sends one in the clear.
    """

    def __init__(self, helper: X25519PublicKey, signer: Signer, federation: str,
                 party: str) -> None:
        self.helper, self.signer = helper, signer
        self.federation, self.party = federation, party
        self._rng = np.random.default_rng()  # fresh entropy: the rounding must not repeat

    def __call__(self, out: Outgoing) -> Outgoing:
        s = out.settings
        if not s.get("secure_aggregation"):
            raise FederationError("this party has --helper-key but the aggregator does not "
                                  "run secure aggregation: it would see the delta in the clear")
        if out.packed is not None:
            raise FederationError("secure aggregation sends float32 deltas masked, not "
                                  "compressed: drop --encoding")
        clip, scale = float(s["secagg_clip"]), float(s["secagg_scale"])
        names = list(out.tensors)
        clipped, norm = clip_l2([out.tensors[n] for n in names], clip)
        seed = masks.new_seed()
        mask = masks.expand(seed, sum(int(c.size) for c in clipped))
        masked: Tensors = {}
        offset = 0
        for name, c in zip(names, clipped, strict=True):
            q = quantize(c, scale, clip, self._rng)
            q += mask[offset:offset + c.size].reshape(c.shape)
            masked[name] = q
            offset += c.size
        out.tensors = masked
        out.sealed_seed = sealing.seal(seed, self.helper, self.federation, self.party, out.seq)
        out.seed_signature = self.signer.sign_statement(sealing.statement(
            self.federation, self.party, out.seq, out.sealed_seed))
        out.metrics["delta_norm"] = norm
        return out


def stages_for(config: WorkerConfig) -> list[DeltaStage]:
    """The stages a worker's settings ask for: privacy (``--dp-clip``), then compression
    (``--encoding`` other than float32), then masking (``--helper-key``: secure
    aggregation)."""
    stages: list[DeltaStage] = []
    if config.dp_clip is not None:
        from worker.privacy import PrivacyFilter  # dp-accounting only when asked for

        # unseeded on purpose: noise derived from --seed could be regenerated and removed
        stages.append(PrivacyStage(PrivacyFilter(config.dp_clip, config.dp_noise,
                                                 config.dp_delta)))
    if config.encoding != "float32":
        from worker.compression import DeltaCompressor

        stages.append(CompressionStage(DeltaCompressor(config.encoding, config.topk_fraction)))
    if config.helper_key is not None:
        from messages.wire.signing import load_signer

        assert config.signing_key is not None  # WorkerConfig requires it with --helper-key
        stages.append(MaskingStage(sealing.load_seal_public(config.helper_key),
                                   load_signer(config.signing_key, config.party),
                                   config.federation, config.party))
    return stages
