"""Messages bigger than one broker message: split into chunks, reassemble, check the hash.

RabbitMQ refuses bodies over its ``max_message_size`` (16 MiB by default on 4.x, 128 MiB on
3.x), and a 50M-parameter float32 delta is 200 MB. So a body over ``max_chunk_bytes`` (a
federation setting every process shares) travels as ``count`` chunks of at most that many
bytes; a body at or under it travels unchanged, with no extra header, as before chunking.

Every chunk carries, besides the headers the body was published with (its signature, which
covers the *whole* body and is checked after reassembly, before decoding):

- ``x-dfl-chunk-id``      one id per chunked publish (a uuid), the key of its set;
- ``x-dfl-chunk-index``   0 .. count-1;
- ``x-dfl-chunk-count``   how many chunks the set has;
- ``x-dfl-chunk-total``   the whole body's length;
- ``x-dfl-chunk-sha256``  the whole body's SHA-256 (hex): reassembly must reproduce it;
- ``x-dfl-chunk-from``    the sender (a party id), when it says: a newer complete set from
  the same sender proves an older incomplete one was abandoned (its sender crashed or
  republished it under a new id after a reconnect), so that one is discarded at once.

This module is pure (no broker): ``split`` plans the chunks of a body, ``Reassembler``
collects chunks per id and yields whole bodies, and reports every set it gives up on
(inconsistent headers, a wrong hash, incomplete for too long, superseded) as ``Discarded``
with the tokens of its chunks, so the caller can dead-letter and settle each delivery.
``messages.transport.chunked`` wires both to a broker connection.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from messages.errors import InvalidMessage
from messages.types import Headers
from messages.wire.bounds import PARTY_ID

CHUNK_ID = "x-dfl-chunk-id"
CHUNK_INDEX = "x-dfl-chunk-index"
CHUNK_COUNT = "x-dfl-chunk-count"
CHUNK_TOTAL = "x-dfl-chunk-total"
CHUNK_SHA256 = "x-dfl-chunk-sha256"
CHUNK_FROM = "x-dfl-chunk-from"
CHUNK_HEADERS = (CHUNK_ID, CHUNK_INDEX, CHUNK_COUNT, CHUNK_TOTAL, CHUNK_SHA256, CHUNK_FROM)
DEFAULT_MAX_CHUNK_BYTES = 8 * 1024 * 1024
"""Half of RabbitMQ 4's default max_message_size: room for headers, and for a broker whose
limit was lowered a little."""
DEFAULT_CHUNK_TIMEOUT = 300.0
"""Seconds an incomplete set may go without a new chunk before it is discarded."""
MAX_CHUNKS = 1 << 20
DEFAULT_MAX_PENDING_BYTES = 256 * 1024 * 1024
"""Bytes of incomplete chunk sets a receiver holds in all, before it gives up the oldest."""
DEFAULT_MAX_PENDING_CHUNKS = 4096
"""Chunks of incomplete sets a receiver holds in all (tiny chunks cost a delivery each)."""
OWN_PREFIX = "x-dfl-"
"""Headers of ours; every chunk of a set must carry the same ones (the broker adds others,
such as a quorum queue's ``x-delivery-count``, which may differ per chunk)."""

T = TypeVar("T")


def chunk_count(size: int, max_chunk_bytes: int) -> int:
    """How many chunks a body of ``size`` bytes travels as (1: unchanged)."""
    return max(1, math.ceil(size / max_chunk_bytes))


@dataclass(frozen=True, slots=True)
class Plan:
    """The chunks of one body, cut on demand so that only one chunk copy lives at a time
    (pika wants ``bytes``, and a slice of ``bytes`` is a copy)."""

    body: bytes
    size: int
    headers: tuple[Headers, ...]

    def __len__(self) -> int:
        return len(self.headers)

    def chunk(self, index: int) -> tuple[bytes, Headers]:
        """Body and headers of chunk ``index``; the body itself when it is not chunked."""
        if len(self.headers) == 1:
            return self.body, self.headers[0]
        start = index * self.size
        return self.body[start:start + self.size], self.headers[index]


def split(body: bytes, max_chunk_bytes: int, headers: Mapping[str, Any] | None = None, *,
          sender: str | None = None, message_id: str | None = None) -> Plan:
    """Plan ``body``'s chunks of at most ``max_chunk_bytes``.

    A body of at most ``max_chunk_bytes`` is one "chunk": itself, with ``headers`` untouched
    and no chunk header, so small messages look exactly as they did before chunking.
    """
    if max_chunk_bytes < 1:
        raise ValueError(f"max_chunk_bytes must be positive, not {max_chunk_bytes}")
    base: Headers = dict(headers or {})
    if len(body) <= max_chunk_bytes:
        return Plan(body, max_chunk_bytes, (base,))
    count = chunk_count(len(body), max_chunk_bytes)
    common = {**base, CHUNK_ID: message_id or uuid.uuid4().hex, CHUNK_COUNT: count,
              CHUNK_TOTAL: len(body), CHUNK_SHA256: hashlib.sha256(body).hexdigest()}
    if sender is not None:
        common[CHUNK_FROM] = sender
    return Plan(body, max_chunk_bytes,
                tuple({**common, CHUNK_INDEX: i} for i in range(count)))


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    """What the chunk headers of one delivery say."""

    id: str
    index: int
    count: int
    total: int
    sha256: str
    sender: str | None


def _int(headers: Mapping[str, Any], name: str) -> int:
    value = headers.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidMessage("chunk-header", f"{name} is {type(value).__name__}, not an int")
    return value


def chunk_info(headers: Mapping[str, Any]) -> ChunkInfo | None:
    """The chunk headers of a delivery; ``None`` for an ordinary (unchunked) message.

    Raises ``InvalidMessage("chunk-header")`` when they are present but malformed.
    """
    if CHUNK_ID not in headers:
        return None
    cid, sha, sender = headers.get(CHUNK_ID), headers.get(CHUNK_SHA256), headers.get(CHUNK_FROM)
    if isinstance(cid, bytes):  # pika hands back AMQP long strings as bytes at times
        cid = cid.decode("utf-8", "replace")
    if isinstance(sha, bytes):
        sha = sha.decode("ascii", "replace")
    if isinstance(sender, bytes):
        sender = sender.decode("utf-8", "replace")
    if not isinstance(cid, str) or not 0 < len(cid) <= 64:
        raise InvalidMessage("chunk-header", f"{CHUNK_ID} must be a short string")
    if not isinstance(sha, str) or len(sha) != 64:
        raise InvalidMessage("chunk-header", f"{CHUNK_SHA256} must be 64 hex digits")
    if sender is not None and not (isinstance(sender, str) and PARTY_ID.match(sender)):
        raise InvalidMessage("chunk-header", f"{CHUNK_FROM} must be a party id")
    index, count, total = (_int(headers, n) for n in (CHUNK_INDEX, CHUNK_COUNT, CHUNK_TOTAL))
    if not (1 <= count <= MAX_CHUNKS and 0 <= index < count and count <= max(total, 1)):
        raise InvalidMessage("chunk-header", f"index {index} of {count} chunks of a "
                                             f"{total}-byte body")
    return ChunkInfo(cid, index, count, total, sha.lower(), sender)


def message_headers(headers: Mapping[str, Any]) -> Headers:
    """``headers`` without the chunk headers: those the whole body was published with."""
    return {k: v for k, v in headers.items() if k not in CHUNK_HEADERS}


def _own(headers: Mapping[str, Any]) -> Headers:
    # a key that is not text (pika hands over a non-UTF-8 table key as bytes) is never ours
    return {k: v for k, v in headers.items()
            if isinstance(k, str) and k.startswith(OWN_PREFIX) and k not in CHUNK_HEADERS}


@dataclass(slots=True)
class Assembled(Generic[T]):
    """A whole body, its headers (without chunk headers), and its chunks' tokens."""

    body: bytes
    headers: Headers
    tokens: list[T]


@dataclass(slots=True)
class Discarded(Generic[T]):
    """A set given up on: the chunks' tokens, what arrived of the body, and why."""

    tokens: list[T]
    body: bytes
    headers: Headers
    error: InvalidMessage


@dataclass(slots=True)
class _Set(Generic[T]):
    info: ChunkInfo
    headers: Headers
    order: int
    touched: float
    pieces: dict[int, bytes] = field(default_factory=dict)
    tokens: list[T] = field(default_factory=list)
    size: int = 0
    chunk_size: int | None = None  # the length of every chunk but the last
    last_size: int | None = None
    hasher: Any = field(default_factory=hashlib.sha256)
    hashed: int = 0  # chunks 0 .. hashed-1 are in the hasher (in-order arrival hashes early)

    def received(self) -> bytes:
        return b"".join(self.pieces[i] for i in sorted(self.pieces))


class Reassembler(Generic[T]):
    """Collects chunks per set id and yields each whole body once all its chunks arrived.

    ``T`` is whatever the caller wants back with each chunk (a broker delivery, to settle).
    Every token given to ``add`` comes back exactly once: in an ``Assembled`` or a
    ``Discarded``, or from ``clear``. Checks, each a ``Discarded`` with a reason slug:
    malformed chunk headers (``chunk-header``), a body over ``max_bytes`` (``too-large``),
    chunks of one id that disagree on count, length, hash, sender or the message's own
    headers (``chunk-mismatch``), chunk lengths that cannot make up the body
    (``chunk-length``), a reassembled body with another SHA-256 (``chunk-hash``), and a set
    that got no chunk for ``timeout`` seconds or was superseded (``chunk-incomplete``).
    """

    def __init__(self, max_bytes: int, timeout: float = DEFAULT_CHUNK_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic, *,
                 max_chunk_bytes: int | None = None,
                 max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
                 max_pending_chunks: int = DEFAULT_MAX_PENDING_CHUNKS) -> None:
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.max_chunk_bytes = max_chunk_bytes
        self.max_pending_bytes = max_pending_bytes
        self.max_pending_chunks = max_pending_chunks
        self._clock = clock
        self._bytes = 0  # bytes of the pieces held in _sets
        self._chunks = 0  # tokens held in _sets
        self._sets: dict[str, _Set[T]] = {}
        self._order = itertools.count()
        self._out: list[Discarded[T]] = []

    @property
    def held(self) -> int:
        """Tokens of chunks waiting for the rest of their set."""
        return self._chunks

    @property
    def held_bytes(self) -> int:
        """Bytes of chunks waiting for the rest of their set."""
        return self._bytes

    @property
    def pending(self) -> int:
        """Sets begun and not finished."""
        return len(self._sets)

    def add(self, headers: Mapping[str, Any], body: bytes, token: T) -> Assembled[T] | None:
        """Take one chunk (``headers`` must carry the chunk headers); the whole message when
        this chunk completes its set, else ``None``. Failures go to ``discarded``."""
        now = self._clock()
        try:
            info = chunk_info(headers)
        except InvalidMessage as exc:
            self._out.append(Discarded([token], body, message_headers(headers), exc))
            return None
        if info is None:
            raise ValueError("not a chunk: give ordinary messages to their handler directly")
        if info.total > self.max_bytes:
            self._fail(info.id, token, body, headers, InvalidMessage(
                "too-large", f"chunked body of {info.total} bytes > limit {self.max_bytes}"))
            return None
        if self.max_chunk_bytes is not None and len(body) > self.max_chunk_bytes:
            self._fail(info.id, token, body, headers, InvalidMessage(
                "too-large", f"chunk of {len(body)} bytes > --max-chunk-bytes "
                             f"{self.max_chunk_bytes}"))
            return None
        self._make_room(info.id, info.sender, len(body))
        s = self._sets.get(info.id)
        if s is None:
            s = self._sets[info.id] = _Set(info, _own(headers), next(self._order), now)
        elif ((s.info.count, s.info.total, s.info.sha256, s.info.sender)
              != (info.count, info.total, info.sha256, info.sender)
              or s.headers != _own(headers)):
            self._fail(info.id, token, body, headers, InvalidMessage(
                "chunk-mismatch", f"chunk {info.index} of {info.id} disagrees with the set's "
                                  "count, length, hash, sender or headers"))
            return None
        s.touched = now
        s.tokens.append(token)
        self._chunks += 1
        if info.index in s.pieces:  # a duplicate: the first copy stands, the hash decides
            return None
        problem = self._check_length(s, info, len(body))
        if problem:
            self._fail(info.id, None, body, headers, InvalidMessage("chunk-length", problem))
            return None
        s.pieces[info.index] = body
        s.size += len(body)
        self._bytes += len(body)
        while s.hashed in s.pieces:
            s.hasher.update(s.pieces[s.hashed])
            s.hashed += 1
        if len(s.pieces) < info.count:
            return None
        self._drop(info.id)
        if s.size != info.total:
            self._out.append(Discarded(s.tokens, s.received(), message_headers(headers),
                                       InvalidMessage("chunk-length", f"{s.size} bytes "
                                                      f"arrived for a {info.total}-byte body")))
            return None
        whole = b"".join(s.pieces[i] for i in range(info.count))
        if s.hasher.hexdigest() != info.sha256:
            self._out.append(Discarded(s.tokens, whole, message_headers(headers), InvalidMessage(
                "chunk-hash", f"reassembled {info.id} does not have the SHA-256 it was sent "
                              "with")))
            return None
        if info.sender is not None:
            self._supersede(info.sender, s.order)
        return Assembled(whole, message_headers(headers), s.tokens)

    @staticmethod
    def _check_length(s: _Set[T], info: ChunkInfo, length: int) -> str:
        """Chunks are cut at one size: all but the last are equal, the last fills the rest.

        Checked as chunks arrive, in any order: the first chunk but the last fixes the size.
        """
        if (length == 0 and info.total > 0) or s.size + length > info.total:
            return f"chunk {info.index} of {length} bytes overruns the {info.total}-byte body"
        if info.index == info.count - 1:
            s.last_size = length
        elif s.chunk_size is None:
            s.chunk_size = length
        elif length != s.chunk_size:
            return f"chunk {info.index} has {length} bytes, the others {s.chunk_size}"
        size = s.chunk_size
        if size is None:
            return ""
        last = info.total - (info.count - 1) * size
        if not 0 < last <= size or (s.last_size is not None and s.last_size != last):
            return (f"{info.count} chunks of {size} bytes cannot make up a "
                    f"{info.total}-byte body")
        return ""

    def _supersede(self, sender: str, order: int) -> None:
        """A newer set of ``sender`` is complete: its older incomplete ones never will be
        (a sender publishes one message at a time, in order, on a FIFO queue)."""
        for sid, s in list(self._sets.items()):
            if s.info.sender == sender and s.order < order:
                self._drop(sid)
                self._out.append(Discarded(s.tokens, s.received(), s.headers, InvalidMessage(
                    "chunk-incomplete", f"{len(s.pieces)} of {s.info.count} chunks of "
                                        f"{sid}; a newer message from {sender} completed")))

    def _fail(self, sid: str, token: T | None, body: bytes, headers: Mapping[str, Any],
              error: InvalidMessage) -> None:
        """Give up on set ``sid`` (if begun) together with the chunk that broke it."""
        s = self._drop(sid)
        tokens = (s.tokens if s is not None else []) + ([token] if token is not None else [])
        received = (s.received() if s is not None else b"") + body
        self._out.append(Discarded(tokens, received, message_headers(headers), error))

    def discarded(self) -> list[Discarded[T]]:
        """Sets given up on since the last call, including those idle past the timeout."""
        now = self._clock()
        for sid, s in list(self._sets.items()):
            if now - s.touched >= self.timeout:
                self._drop(sid)
                self._out.append(Discarded(s.tokens, s.received(), s.headers, InvalidMessage(
                    "chunk-incomplete", f"{len(s.pieces)} of {s.info.count} chunks of {sid} "
                                        f"and none for {self.timeout:g} s")))
        out, self._out = self._out, []
        return out

    def clear(self) -> list[T]:
        """Forget every set (the connection they came on is gone); their tokens."""
        tokens = [t for s in self._sets.values() for t in s.tokens]
        tokens += [t for d in self._out for t in d.tokens]
        self._sets.clear()
        self._out.clear()
        self._bytes = self._chunks = 0
        return tokens

    def _drop(self, sid: str) -> _Set[T] | None:
        """Stop holding set ``sid`` (its bytes and chunks no longer count)."""
        s = self._sets.pop(sid, None)
        if s is not None:
            self._bytes -= s.size
            self._chunks -= len(s.tokens)
        return s

    def _make_room(self, sid: str, sender: str | None, size: int) -> None:
        """Keep what incomplete sets hold within the bounds before a chunk of ``size`` bytes
        joins set ``sid``: at most ``max_bytes`` per sender (one whole message; its older
        sets go first), ``max_pending_bytes`` and ``max_pending_chunks`` in all (the oldest
        sets go first). A set given up on is ``chunk-overflow``: a hostile or broken party
        that never finishes its sets cannot grow the receiver's memory past the bounds."""
        def evict(victims: list[str], why: str) -> None:
            for victim in victims:
                s = self._drop(victim)
                if s is not None:
                    self._out.append(Discarded(s.tokens, s.received(), s.headers, InvalidMessage(
                        "chunk-overflow", f"{len(s.pieces)} of {s.info.count} chunks of "
                                          f"{victim} given up: {why}")))

        if sender is not None:
            mine = [k for k, s in self._sets.items() if s.info.sender == sender and k != sid]
            held = sum(self._sets[k].size for k in mine) + (
                self._sets[sid].size if sid in self._sets else 0)
            while mine and held + size > self.max_bytes:
                held -= self._sets[mine[0]].size
                evict([mine.pop(0)], f"{sender} holds more than {self.max_bytes} bytes")
        others = [k for k in self._sets if k != sid]
        while others and (self._bytes + size > self.max_pending_bytes
                          or self._chunks + 1 > self.max_pending_chunks):
            evict([others.pop(0)], f"incomplete sets hold over {self.max_pending_bytes} bytes "
                                   f"or {self.max_pending_chunks} chunks")


def model_size_bound(tensors: Mapping[str, Any]) -> int:
    """An upper bound of the encoded size of a ``Model`` of ``tensors`` (numpy arrays), got
    without encoding it: the aggregator asks it every version, and encoding a 200 MB model
    just to measure it would double the cost of a broadcast. msgpack adds to each tensor's
    bytes its name, dtype, shape and four headers; the message's other fields are small."""
    return 128 + sum(32 + len(name.encode()) + 9 * int(a.ndim) + int(a.nbytes)
                     for name, a in tensors.items())
