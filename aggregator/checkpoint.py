"""Crash-consistent checkpoints of the aggregator's state.

A checkpoint is one file: ``MAGIC``, a CRC-32 of everything after it, the length of a
msgpack header, the header (the state, each numpy array replaced by an extension type
holding its dtype, shape and where its bytes lie; no pickle), then the arrays' raw bytes.
The weights are written straight from their buffers, never copied into a payload first: a
checkpoint is taken every few updates, and packing plus SHA-256 of the built-in CNN's 4.8 MB
cost the aggregator more than decoding its updates (``benchmarks/throughput.py --profile``).
A CRC-32 catches what it must here, a torn or bit-rotted file on our own disk, 6x faster.
Files of the first format (``MAGIC_V1``: SHA-256, arrays inside the msgpack payload) are
still read.

A file is written to a temporary file in the same folder, fsynced, renamed over its final
name, and the folder is fsynced: a crash at any point leaves either the old set of
checkpoints or the new one, never a half-written file under a checkpoint's name. Reading
verifies the checksum, so a truncated or corrupted file is detected and the previous
checkpoint is used instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from messages.errors import FederationError
from messages.types import NDArrays

log = logging.getLogger("dfl.checkpoint")

MAGIC = b"DFLCKPT2"
MAGIC_V1 = b"DFLCKPT1"
_ARRAY_EXT = 1  # version 1: [dtype, shape, raw bytes] inside the payload
_ARRAY_REF_EXT = 2  # version 2: [dtype, shape, offset, nbytes] into the data after the header
_PREFIX = struct.Struct(">IQ")  # CRC-32 of the rest, length of the msgpack header
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
    seqs: dict[str, list[int]] = field(default_factory=dict)
    """``AppliedSeqs.state()``; absent from checkpoints before exact dedupe."""
    incarnation: dict[str, int] = field(default_factory=dict)
    strategy: dict[str, Any] = field(default_factory=dict)
    parties: list[dict[str, Any]] = field(default_factory=list)
    counters: dict[str, Any] = field(default_factory=dict)
    ledger: list[list[Any]] = field(default_factory=list)


def dump_parts(state: AggregatorState) -> list[bytes | memoryview]:
    """The checkpoint file's bytes for ``state``, in pieces: the weights' own buffers are
    among them, so writing the pieces copies no array."""
    buffers: list[memoryview] = []
    offset = 0

    def default(obj: Any) -> Any:
        nonlocal offset
        if isinstance(obj, np.ndarray):
            a = np.asarray(obj, order="C")
            raw = a.reshape(-1).view(np.uint8).data
            buffers.append(raw)
            offset += raw.nbytes
            return msgpack.ExtType(_ARRAY_REF_EXT, msgpack.packb(
                [a.dtype.str, list(a.shape), offset - raw.nbytes, raw.nbytes]))
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, (set, frozenset, tuple)):
            return list(obj)
        raise TypeError(f"cannot checkpoint a {type(obj).__name__}")

    # a shallow map: dataclasses.asdict would deep-copy every weight array first
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    header: bytes = msgpack.packb(fields, default=default, use_bin_type=True)
    crc = zlib.crc32(header, zlib.crc32(struct.pack(">Q", len(header))))
    for raw in buffers:
        crc = zlib.crc32(raw, crc)
    return [MAGIC + _PREFIX.pack(crc, len(header)), header, *buffers]


def dumps(state: AggregatorState) -> bytes:
    """The checkpoint file's bytes for ``state``, in one piece."""
    return b"".join(dump_parts(state))


def loads(data: bytes) -> AggregatorState:
    """Parse and verify a checkpoint file's bytes (``CheckpointError`` when damaged)."""
    if data.startswith(MAGIC_V1):
        return _loads_v1(data)
    head = len(MAGIC) + _PREFIX.size
    if len(data) < head or not data.startswith(MAGIC):
        raise CheckpointError("not a checkpoint file (bad magic or truncated header)")
    crc, size = _PREFIX.unpack_from(data, len(MAGIC))
    if zlib.crc32(memoryview(data)[len(MAGIC) + 4:]) != crc or head + size > len(data):
        raise CheckpointError("checksum mismatch: the file is truncated or corrupted")
    arrays = memoryview(data)[head + size:]

    def ext_hook(code: int, ext: bytes) -> Any:
        if code != _ARRAY_REF_EXT:
            raise CheckpointError(f"unknown extension type {code}")
        dtype, shape, start, nbytes = msgpack.unpackb(ext, raw=False)
        if start + nbytes > len(arrays):
            raise CheckpointError("an array lies past the end of the file")
        # a writable copy: restored weights are updated in place by the strategies
        return np.frombuffer(arrays[start:start + nbytes], dtype=np.dtype(dtype)
                             ).reshape(shape).copy()

    return _state(memoryview(data)[head:head + size], ext_hook)


def _loads_v1(data: bytes) -> AggregatorState:
    head = len(MAGIC_V1) + 32
    digest, payload = data[len(MAGIC_V1):head], data[head:]
    if len(data) < head or hashlib.sha256(payload).digest() != digest:
        raise CheckpointError("checksum mismatch: the file is truncated or corrupted")

    def ext_hook(code: int, ext: bytes) -> Any:
        if code != _ARRAY_EXT:
            raise CheckpointError(f"unknown extension type {code}")
        dtype, shape, raw = msgpack.unpackb(ext, raw=False)
        return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy()

    return _state(payload, ext_hook)


def _state(payload: bytes | memoryview, ext_hook: Any) -> AggregatorState:
    try:
        fields = msgpack.unpackb(payload, raw=False, ext_hook=ext_hook, strict_map_key=False)
        return AggregatorState(**fields)
    except CheckpointError:
        raise
    except Exception as exc:  # a valid checksum over a payload we cannot read: another version
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
                f.writelines(dump_parts(state))
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

    @property
    def _mark(self) -> Path:
        return self.directory / "broadcast-version"

    def broadcast_mark(self) -> int:
        """The highest model version ever broadcast from this folder's state (-1: none)."""
        try:
            return int(self._mark.read_text().strip())
        except (OSError, ValueError):
            return -1

    def mark_broadcast(self, version: int) -> None:
        """Record, before it is sent, that model ``version`` is about to be broadcast.

        A checkpoint lags the newest version by up to a batch, so an aggregator that restarts
        from it would otherwise broadcast a *different* model under version numbers the
        parties already hold. Written atomically (temp file, rename) on every broadcast (at
        most every ``--broadcast-interval``); not fsynced, as a process crash keeps the page
        cache (a power loss would lose the parties' models as well), and the next
        checkpoint's fsync of the folder makes it durable.
        """
        tmp = self.directory / ".broadcast-version.tmp"
        tmp.write_text(str(version))
        os.replace(tmp, self._mark)

