"""The privacy a DP-SGD party has spent: every step it ever ran, kept on disk, and its epsilon.

One DP-SGD step (``worker.dpsgd``) is the Poisson-sampled Gaussian mechanism: each record of
the party's shard is in the step's batch independently with probability ``q``, each
record's gradient is clipped to L2 norm ``C``, and noise of standard deviation ``z * C`` is
added to their sum. ``dp-accounting`` composes ``T`` such steps as
``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), T)`` and its RDP
accountant turns that into epsilon at a chosen delta (add-or-remove-one-record adjacency).

The ledger keeps one segment per setting ``(z, q, C)`` in the order they were used: a party
restarted with another ``--noise-multiplier`` or against an aggregator with another
``--batch-size`` starts a new segment, and epsilon is the composition of all segments (the
composition of different mechanisms is exactly what RDP accounts for), never a fresh start.

Steps are recorded **before** they run and the file is replaced atomically (temporary file,
fsync, ``os.replace``, fsync of the folder), so a crash at any point leaves a ledger that
counts at least every step whose result could have left the party. A ledger that cannot be
read stops the party (``StateError``): starting again from zero would silently forget spent
privacy. Deleting the file does exactly that; keep the state directory on storage that
survives the party (a volume in Kubernetes).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import dp_accounting

from messages.errors import StateError

FORMAT = "dfl-dp-sgd-ledger/1"
LEDGER_FILE = "dp-sgd-ledger.json"


@dataclass(frozen=True, slots=True)
class StepSetting:
    """What one DP-SGD step is, for the accountant: noise multiplier ``z``, sampling rate
    ``q`` and clip norm ``C`` (``C`` does not change epsilon; it is kept as a record)."""

    noise_multiplier: float
    sampling_rate: float
    l2_clip: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise StateError(f"noise multiplier {self.noise_multiplier!r}: must be > 0")
        if not 0 < self.sampling_rate <= 1:
            raise StateError(f"sampling rate {self.sampling_rate!r}: must be in (0, 1]")
        if not (math.isfinite(self.l2_clip) and self.l2_clip > 0):
            raise StateError(f"clip norm {self.l2_clip!r}: must be > 0")


@dataclass(frozen=True, slots=True)
class Segment:
    """``steps`` consecutive steps of one setting."""

    setting: StepSetting
    steps: int


def dp_sgd_epsilon(segments: list[Segment], delta: float) -> float:
    """Epsilon at ``delta`` of the segments composed in order (RDP accountant); 0 for none."""
    events = [dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            s.setting.sampling_rate, dp_accounting.GaussianDpEvent(s.setting.noise_multiplier)),
        s.steps) for s in segments if s.steps > 0]
    if not events:
        return 0.0
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.ComposedDpEvent(events))
    return float(accountant.get_epsilon(delta))


class StepLedger:
    """Every DP-SGD step a party ran, persisted in ``directory/dp-sgd-ledger.json``.

    Loading refuses a file that is not a ledger (``StateError``, one line). ``record`` adds
    steps (negative to give back steps reserved but never run) and writes the file before it
    returns; ``epsilon`` composes what is recorded, plus ``more`` steps of ``setting`` when
    asked (what the next round would cost).
    """

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / LEDGER_FILE
        self.segments: list[Segment] = self._load() if self.path.exists() else []

    @property
    def steps(self) -> int:
        """All steps recorded, of every setting."""
        return sum(s.steps for s in self.segments)

    def epsilon(self, delta: float, setting: StepSetting | None = None, more: int = 0) -> float:
        """Epsilon at ``delta`` of the recorded steps and ``more`` steps of ``setting``."""
        segments = list(self.segments)
        if setting is not None and more > 0:
            segments.append(Segment(setting, more))
        return dp_sgd_epsilon(segments, delta)

    def record(self, setting: StepSetting, steps: int) -> None:
        """Add ``steps`` of ``setting`` (after the last segment when it has the same
        setting) and write the ledger durably; ``StateError`` when it cannot be written."""
        if self.segments and self.segments[-1].setting == setting:
            last = self.segments[-1]
            self.segments[-1] = Segment(setting, last.steps + steps)
        else:
            self.segments.append(Segment(setting, steps))
        if self.segments[-1].steps < 0:
            raise StateError(f"ledger {self.path}: gave back more steps than were recorded")
        self._write()

    def _load(self) -> list[Segment]:
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT!r}")
            return [Segment(StepSetting(float(s["noise_multiplier"]),
                                        float(s["sampling_rate"]), float(s["l2_clip"])),
                            int(s["steps"])) for s in data["segments"]]
        except (OSError, ValueError, TypeError, KeyError, AttributeError, StateError) as exc:
            raise StateError(f"cannot read the DP-SGD ledger {self.path} ({exc}); it holds the "
                             "privacy this party has spent: restore it from a backup (deleting "
                             "it forgets the spent epsilon)") from None

    def _write(self) -> None:
        body = json.dumps({"format": FORMAT, "segments": [
            {**asdict(s.setting), "steps": s.steps} for s in self.segments]}, indent=1)
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w") as f:
                f.write(body + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # make the rename itself durable
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise StateError(f"cannot write the DP-SGD ledger {self.path} ({exc}); give "
                             "--state-dir a writable folder that survives restarts") from None
