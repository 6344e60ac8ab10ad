"""The worker's settings: flags > ``DFL_*`` environment > ``--config`` TOML > defaults."""

from __future__ import annotations

import re
import socket
from typing import Literal

from pydantic import Field, field_validator, model_validator

from messages.daemon.settings import FederationSettings
from messages.wire.compression import DEFAULT_TOPK_FRACTION, Encoding
from worker.partition import Scheme


def ordinal_from_hostname(hostname: str | None = None) -> int:
    """The trailing number of the host name: a StatefulSet pod ``worker-3`` is party 3."""
    name = hostname or socket.gethostname()
    match = re.search(r"(\d+)$", name.split(".")[0])
    if match is None:
        raise ValueError(f"--party-id hostname: host name {name!r} does not end in a number")
    return int(match.group(1))


class WorkerConfig(FederationSettings):
    """Everything a ``Worker`` needs; see ``dfl worker --help`` for each option.

    ``party_id`` is a number, ``"hostname"`` (taken from the host name's trailing number at
    construction) or ``"auto"`` (the lowest id no running party holds, claimed through the
    broker when the worker starts).
    """

    party_id: int | Literal["auto"] = 0
    num_parties: int = Field(default=2, ge=1)
    partition: Scheme = "iid"
    alpha: float = Field(default=0.5, gt=0)
    shards_per_party: int = Field(default=2, ge=1)
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    join_timeout: float = Field(default=10.0, gt=0)
    slowdown: float = Field(default=1.0, ge=1)
    slowdown_sigma: float = Field(default=0.0, ge=0)
    # differential privacy of the outgoing deltas (worker/privacy.py)
    dp_clip: float | None = Field(default=None, gt=0)
    dp_noise: float = Field(default=0.0, ge=0)
    dp_delta: float = Field(default=1e-5, gt=0, lt=1)
    # record-level differential privacy: DP-SGD inside local training (worker/dpsgd.py),
    # its steps counted in a ledger under state_dir (worker/accounting.py)
    dp_sgd: bool = False
    noise_multiplier: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    l2_clip: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    target_epsilon: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    state_dir: str = "dfl-state"
    # how the deltas travel (messages/wire/compression.py), with error feedback
    # (worker/compression.py)
    encoding: Encoding = "float32"
    topk_fraction: float = Field(default=DEFAULT_TOPK_FRACTION, gt=0, le=1)
    # authenticity: this party's signing key, and the aggregator's public key
    signing_key: str | None = None
    aggregator_key: str | None = None
    # secure aggregation: the helper's X25519 public key (helper-seal.pem); worker/pipeline.py
    helper_key: str | None = None

    @field_validator("party_id", mode="before")
    @classmethod
    def _party_id(cls, value: object) -> object:
        if value == "hostname":
            return ordinal_from_hostname()
        if isinstance(value, str) and value.isdigit():
            return int(value)
        return value

    @model_validator(mode="after")
    def _in_range(self) -> WorkerConfig:
        if isinstance(self.party_id, int) and not 0 <= self.party_id < self.num_parties:
            raise ValueError(f"--party-id {self.party_id}: must be in 0..{self.num_parties - 1} "
                             f"(one shard per party of --num-parties {self.num_parties}), "
                             "or auto, or hostname")
        if self.signing_key and self.party_id == "auto":
            raise ValueError("--signing-key belongs to one party: give its --party-id "
                             "instead of auto")
        if self.helper_key and not self.signing_key:
            raise ValueError("--helper-key needs --signing-key: the helper opens a party's "
                             "seed only with the party's Ed25519 signature over it")
        if self.helper_key and self.encoding != "float32":
            raise ValueError(f"--helper-key with --encoding {self.encoding}: masked deltas "
                             "travel as 32-bit words; drop --encoding")
        if self.dp_noise > 0 and self.dp_clip is None:
            raise ValueError(f"--dp-noise {self.dp_noise:g} needs --dp-clip: the noise is "
                             "SIGMA times the clip norm")
        self._check_dp_sgd()
        return self

    def _check_dp_sgd(self) -> None:
        if not self.dp_sgd:
            given = [flag for flag, value in (("--noise-multiplier", self.noise_multiplier),
                                              ("--l2-clip", self.l2_clip),
                                              ("--target-epsilon", self.target_epsilon))
                     if value is not None]
            if given:
                raise ValueError(f"{given[0]} is a DP-SGD setting: add --dp-sgd")
            return
        if self.noise_multiplier is None or self.l2_clip is None:
            raise ValueError("--dp-sgd needs --noise-multiplier Z and --l2-clip C (e.g. 1.1 "
                             "and 1.0, as in TensorFlow Privacy's MNIST tutorial)")
        if self.dp_clip is not None:
            raise ValueError("--dp-sgd and --dp-clip: choose one (record-level DP-SGD, or "
                             "party-level clipping and noise of each update)")

    def _missing_keys(self) -> tuple[list[str], str]:
        missing = [flag for flag, value in (("--signing-key", self.signing_key),
                                            ("--aggregator-key", self.aggregator_key))
                   if not value]
        return missing, ("pass --signing-key DIR/ID.key and --aggregator-key "
                         "DIR/aggregator.pub (made by `dfl admin add-party ID --keys DIR` and "
                         "`dfl admin add-aggregator --keys DIR`)")

    @property
    def party(self) -> str:
        """The party's id on the wire and in queue names (after ``auto`` was resolved)."""
        return str(self.party_id)
