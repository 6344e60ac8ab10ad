"""Crash-consistent checkpoints of the aggregator's state.

A checkpoint is one file: ``MAGIC``, the SHA-256 of the payload, then the payload (msgpack;
numpy arrays as an extension type holding dtype, shape and raw bytes; no pickle). It is
written to a temporary file in the same folder, fsynced, renamed over its final name, and
the folder is fsynced: a crash at any point leaves either the old set of checkpoints or the
new one, never a half-written file under a checkpoint's name. Reading verifies the hash, so a
truncated or corrupted file is detected and the previous checkpoint is used instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from messages.errors import FederationError
from messages.types import NDArrays

log = logging.getLogger("dfl.checkpoint")

MAGIC = b"DFLCKPT1"
_ARRAY_EXT = 1
_FILE = re.compile(r"^checkpoint-(\d{12})\.dfl$")


class CheckpointError(FederationError):
    """A checkpoint file is truncated, corrupted or not a checkpoint."""


@dataclass(slots=True)
class AggregatorState:
    """Everything the aggregator needs to resume exactly where a checkpoint left it."""

    version: int = -1
    released: bool = False
    names: list[str] = field(default_factory=list)
    weights: NDArrays = field(default_factory=list)
    last_seq: dict[str, int] = field(default_factory=dict)
    incarnation: dict[str, int] = field(default_factory=dict)
    strategy: dict[str, Any] = field(default_factory=dict)
    parties: list[dict[str, Any]] = field(default_factory=list)
    counters: dict[str, Any] = field(default_factory=dict)
    ledger: list[list[Any]] = field(default_factory=list)


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        a = np.asarray(obj, order="C")
        raw = a.reshape(-1).view(np.uint8).data  # packed without a tobytes() copy
        data = msgpack.packb([a.dtype.str, list(a.shape), raw], use_bin_type=True)
        return msgpack.ExtType(_ARRAY_EXT, data)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != _ARRAY_EXT:
        raise CheckpointError(f"unknown extension type {code}")
    dtype, shape, raw = msgpack.unpackb(data, raw=False)
    # a writable copy: restored weights are updated in place by the strategies
    return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy()


def dumps(state: AggregatorState) -> bytes:
    """The checkpoint file's bytes for ``state``."""
    # a shallow map: dataclasses.asdict would deep-copy every weight array first
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    payload: bytes = msgpack.packb(fields, default=_default, use_bin_type=True)
    return MAGIC + hashlib.sha256(payload).digest() + payload


def loads(data: bytes) -> AggregatorState:
    """Parse and verify a checkpoint file's bytes (``CheckpointError`` when damaged)."""
    head = len(MAGIC) + 32
    if len(data) < head or not data.startswith(MAGIC):
        raise CheckpointError("not a checkpoint file (bad magic or truncated header)")
    digest, payload = data[len(MAGIC):head], data[head:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError("checksum mismatch: the file is truncated or corrupted")
    try:
        fields = msgpack.unpackb(payload, raw=False, ext_hook=_ext_hook, strict_map_key=False)
        return AggregatorState(**fields)
    except CheckpointError:
        raise
    except Exception as exc:  # a valid hash over a payload we cannot read: another version
        raise CheckpointError(f"unreadable payload: {exc}") from None


class CheckpointStore:
    """Numbered checkpoint files in one folder; the newest ``keep`` are kept."""

    def __init__(self, directory: str | Path, keep: int = 3) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep = max(keep, 2)

    def files(self) -> list[Path]:
        """Checkpoint files, newest first."""
        found = [p for p in self.directory.iterdir() if _FILE.match(p.name)]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def save(self, state: AggregatorState) -> Path:
        """Write ``state`` atomically as the newest checkpoint; returns its path."""
        files = self.files()
        number = int(_FILE.match(files[0].name).group(1)) + 1 if files else 1  # type: ignore[union-attr]
        final = self.directory / f"checkpoint-{number:012d}.dfl"
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".checkpoint-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(dumps(state))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
        for old in self.files()[self.keep:]:
            old.unlink(missing_ok=True)
        return final

    def load_latest(self) -> AggregatorState | None:
        """The newest checkpoint that verifies; damaged ones are logged and skipped.

        Falling back loses what the damaged checkpoint held (its deliveries were acked), so
        it is logged as an error. An ``OSError`` (permissions, I/O) is not damage: it is
        raised rather than silently starting from an older state.
        """
        for path in self.files():
            try:
                state = loads(path.read_bytes())
            except CheckpointError as exc:
                log.error("checkpoint %s is damaged (%s); using the previous one: updates "
                          "acked under it are lost", path.name, exc)
                continue
            log.info("resuming from %s: version %d", path.name, state.version)
            return state
        return None
