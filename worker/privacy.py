"""Differential privacy of a party's updates against a curious aggregator (or broker).

Threat model: the party trusts nobody with its data, not the aggregator's operator nor
anyone who can read ``F.updates``. So the party itself bounds and blurs what leaves it:
each delta is clipped to L2 norm ``C`` over all tensors and Gaussian noise of standard
deviation ``sigma * C`` is added to every coordinate (the Gaussian mechanism with
sensitivity ``C``, as in DP-FedAvg, McMahan et al. 2018, but applied by the party instead of
a trusted server).

What one "step" is: one published update. The unit protected is the party's whole training
set (party-level privacy: swapping every record of the party changes one delta by at most
``C`` after clipping). There is no subsampling amplification (the party takes part in every
update it sends), and asynchrony does not help either: the aggregator sees each update on
its own, whatever its staleness or mixing weight, so ``T`` updates compose as ``T`` Gaussian
mechanisms. ``dp-accounting``'s RDP accountant turns that into epsilon at the chosen delta.

Because each party adds its own noise, nothing is averaged away before the aggregator sees
it: with few parties, useful accuracy needs a small ``sigma`` and so a large epsilon. It fits
many parties whose updates are averaged (FedBuff with a large K). Record-level guarantees
come from DP-SGD inside local training instead (``--dp-sgd``, ``worker/dpsgd.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import dp_accounting
import numpy as np

from messages.errors import ConfigError
from messages.types import NDArrays


@dataclass
class PrivacyFilter:
    """Clips and noises each outgoing delta and keeps the party's running epsilon.

    The noise comes from fresh operating-system entropy unless ``seed`` is given (tests
    only): noise anyone can regenerate, e.g. from the federation's shared ``--seed``, can be
    subtracted again and protects nothing.
    """

    clip: float
    noise_multiplier: float = 0.0
    delta: float = 1e-5
    seed: int | None = None
    steps: int = 0
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"--dp-clip {self.clip!r}: must be a finite L2 norm > 0")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ConfigError(f"--dp-noise {self.noise_multiplier!r}: must be >= 0 "
                              "(0 clips without noise)")
        if not 0 < self.delta < 1:
            raise ConfigError(f"--dp-delta {self.delta!r}: must be in (0, 1), e.g. 1e-5")
        self._rng = np.random.default_rng(self.seed)

    def apply(self, delta: NDArrays) -> NDArrays:
        """The privatised copy of ``delta`` (float32, same shapes); counts one step."""
        norm = math.sqrt(sum(float(np.dot(d.ravel(), d.ravel())) for d in delta))
        scale = min(1.0, self.clip / norm) if norm > 0 else 1.0
        std = self.noise_multiplier * self.clip
        out: NDArrays = []
        for d in delta:  # one new float32 array per tensor (and one for its noise)
            x = np.multiply(d, np.float32(scale), dtype=np.float32)
            if std > 0:
                noise = self._rng.standard_normal(size=d.shape, dtype=np.float32)
                noise *= np.float32(std)
                x += noise
            out.append(x)
        self.steps += 1
        return out

    @property
    def epsilon(self) -> float:
        """Epsilon at ``delta`` spent by the updates sent so far (inf without noise)."""
        if self.steps == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        return epsilon_for(self.noise_multiplier, self.steps, self.delta)


def epsilon_for(noise_multiplier: float, steps: int, delta: float) -> float:
    """Epsilon of ``steps`` Gaussian mechanisms of this noise multiplier (RDP accountant)."""
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.GaussianDpEvent(noise_multiplier), steps))
    return float(accountant.get_epsilon(delta))
