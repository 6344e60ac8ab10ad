"""msgpack codec for every message kind, with validation on the way in.

Wire format: one msgpack map ``{"v": SCHEMA_VERSION, "kind": ..., <fields>}``. Tensors travel
as ``[name, dtype, shape, raw little-endian bytes]``; decoding wraps the bytes msgpack hands
back with ``np.frombuffer``, so tensor data is not copied again (the arrays are read-only
views). No pickle anywhere: a message from the network is data, never code. An update whose
``encoding`` is float16, int8 or topk carries that encoding's entries instead (see
``messages.wire.compression``); they are decoded into new dense float32 arrays right here, so
nothing past ``decode`` ever sees a compressed delta. The ``encoding`` field is optional
(float32), so bodies from before compression existed decode unchanged.

Every problem with a body raises ``InvalidMessage`` with a reason slug that becomes the
dead-letter header; nothing else escapes ``decode``. Besides types, every value is checked
against its bound (``messages.wire.bounds``): integers (``out-of-bounds``; ``bad-samples`` for
sample counts), party ids (``bad-party``), other strings (``bad-text``: too long or not
printable), floats (``non-finite``), and the entries of maps and lists (``too-many``), so that
whatever ``decode`` accepts can be re-encoded as msgpack or JSON, used as a metric label and
logged. The field types come from the kinds' annotations (``typing.get_type_hints``), the
bound of each integer and string field from ``_INT_BOUNDS`` and ``_TEXT_BOUNDS``: a field
without one is an import-time error.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import reprlib
from collections.abc import Callable, Mapping
from typing import Any, get_type_hints

import msgpack
import numpy as np

from messages.errors import InvalidMessage
from messages.types import Document, NDArray, Settings, Tensors
from messages.wire import bounds, compression
from messages.wire.bounds import MAX_INT, PARTY_ID
from messages.wire.compression import Packed
from messages.wire.kinds import KINDS, Message, Update

SCHEMA_VERSION = 1
DEFAULT_MAX_BYTES = 128 * 1024 * 1024
"""RabbitMQ 3.x's default max message size; 4.x lowers it to 16 MiB."""

ALLOWED_DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("float32", "float16", "float64", "int8", "uint8", "int32", "int64", "uint32")
}
"""Tensor dtypes on the wire (``uint32``: masked words of secure aggregation)."""
ENCODINGS = frozenset(compression.ENCODINGS)
MAX_SAMPLES = bounds.MAX_SAMPLES
"""Bigger declared sample counts are absurd (kept for callers; see ``messages.wire.bounds``)."""


def encode(msg: Message, *, packed: Mapping[str, Packed] | None = None) -> bytes:
    """Serialize a message; tensors are packed from their buffers without an extra copy.

    An ``Update`` whose ``encoding`` is not float32 sends its delta in that encoding (see
    ``messages.wire.compression``): ``packed`` gives the tensors already encoded (a party's
    error-feedback compressor does), in which case they travel instead of ``msg.tensors``;
    without it each tensor of ``msg.tensors`` is encoded here with the defaults.
    """
    fields = _SPECS.get(type(msg)) or _fields_of(type(msg))
    packer = msgpack.Packer(use_bin_type=True)
    # Everything but tensor data is packed as usual into small pieces; each tensor's bytes
    # join them as a buffer, so the one copy of the data is b"".join's into the body
    # (msgpack's own buffer would grow by doubling and then be copied out again).
    parts: list[bytes | memoryview] = [packer.pack_map_header(2 + len(fields)),
                                       packer.pack("v"), packer.pack(SCHEMA_VERSION),
                                       packer.pack("kind"), packer.pack(msg.KIND)]
    for f in fields:
        value = getattr(msg, f.name)
        parts.append(packer.pack(f.name))
        if not f.tensors:
            parts.append(packer.pack(value))
            continue
        entries = (_pack_tensors(value) if packed is None and getattr(
            msg, "encoding", "float32") == "float32" else _pack_encoded(msg, packed))
        parts.append(packer.pack_array_header(len(entries)))
        offset = sum(len(p) for p in parts)  # no tensor data yet: all bytes
        for entry in entries:
            packed_entry = _pack_entry(packer, entry, offset)
            offset += sum(len(p) if isinstance(p, bytes) else p.nbytes for p in packed_entry)
            parts += packed_entry
    return b"".join(parts)


def _pack_entry(packer: msgpack.Packer, entry: list[Any], offset: int
                ) -> list[bytes | memoryview]:
    """One tensor entry, its first buffer starting at a multiple of 8 bytes into the body.

    The receiver wraps the bytes where they lie (no copy), and numpy's fast loops and BLAS
    need element-aligned data: a misaligned view made the finite check 6x slower. msgpack
    lets a string or array header be wider than it must be, so the entry's own headers
    absorb the padding and the body stays plain msgpack that any reader parses.
    """
    name, dtype, dims = entry[0].encode(), entry[1].encode(), b"".join(map(packer.pack, entry[2]))
    lead, dtype_h, dims_h = _entry_headers(
        len(entry), len(name), len(dtype), len(entry[2]),
        (offset + len(name) + len(dtype) + len(dims) + 5) % _ALIGN)  # 5: bin 32 header
    parts: list[bytes | memoryview] = [lead + name + dtype_h + dtype + dims_h + dims]
    for x in entry[3:]:
        if isinstance(x, memoryview):  # bin 32 header, then the raw bytes
            parts += [b"\xc6" + x.nbytes.to_bytes(4, "big"), x]
        else:
            parts.append(packer.pack(x))
    return parts


_ALIGN = 8


@functools.lru_cache(maxsize=256)
def _str_headers(n: int) -> tuple[bytes, ...]:
    """Every msgpack header for a string of ``n`` bytes, narrowest first."""
    out = [bytes([0xA0 | n])] if n < 32 else []
    if n < 256:
        out.append(b"\xd9" + bytes([n]))
    if n < 65536:
        out.append(b"\xda" + n.to_bytes(2, "big"))
    return (*out, b"\xdb" + n.to_bytes(4, "big"))


@functools.lru_cache(maxsize=256)
def _array_headers(n: int) -> tuple[bytes, ...]:
    """Every msgpack header for an array of ``n`` items, narrowest first."""
    out = [bytes([0x90 | n])] if n < 16 else []
    if n < 65536:
        out.append(b"\xdc" + n.to_bytes(2, "big"))
    return (*out, b"\xdd" + n.to_bytes(4, "big"))


@functools.lru_cache(maxsize=1024)
def _entry_headers(items: int, name: int, dtype: int, ndim: int, rest: int
                   ) -> tuple[bytes, bytes, bytes]:
    """The headers of an entry of ``items`` items, a ``name``-byte name, a ``dtype``-byte
    dtype and ``ndim`` dimensions, whose data starts ``rest`` bytes (mod ``_ALIGN``) plus the
    headers past an ``_ALIGN`` boundary: the narrowest combination that puts the data on a
    boundary (any exists, as each header can grow by 0, 1, 2 or 4 bytes). Returns the
    entry's array header with the name's string header, the dtype's, and the shape's."""
    options = (_array_headers(items), _str_headers(name), _str_headers(dtype),
               _array_headers(ndim))
    best: tuple[int, tuple[bytes, ...]] | None = None
    for chosen in itertools.product(*options):
        total = sum(map(len, chosen))
        if (rest + total) % _ALIGN == 0 and (best is None or total < best[0]):
            best = (total, chosen)
    array_h, name_h, dtype_h, dims_h = best[1] if best else tuple(o[0] for o in options)
    return array_h + name_h, dtype_h, dims_h


def _pack_encoded(msg: Message, packed: Mapping[str, Packed] | None) -> list[list[Any]]:
    if not isinstance(msg, Update):
        raise TypeError(f"only an update's tensors are encoded, not a {msg.KIND}'s")
    if msg.encoding not in ENCODINGS:
        raise InvalidMessage("bad-encoding", f"encoding {msg.encoding!r} is not one of "
                                             f"{sorted(ENCODINGS)}")
    if packed is None:
        packed = {name: compression.pack(a, msg.encoding) for name, a in msg.tensors.items()}
    for name, p in packed.items():
        if p.encoding != msg.encoding:
            raise ValueError(f"tensor {name!r} is packed as {p.encoding}, the update says "
                             f"{msg.encoding}")
    return [p.entry(name) for name, p in packed.items()]


def _pack_tensors(tensors: Tensors) -> list[list[Any]]:
    packed = []
    for name, array in tensors.items():
        a = np.asarray(array, order="C")  # ascontiguousarray would turn scalars into 1-d
        dtype = _WIRE_NAMES.get(a.dtype)  # dtype.name is a slow property: map the dtype
        if dtype is None:
            raise InvalidMessage("bad-dtype", f"tensor {name!r} has dtype {a.dtype.name}")
        if a.dtype != ALLOWED_DTYPES[dtype]:  # the wire is little-endian
            a = a.astype(ALLOWED_DTYPES[dtype])
        data = memoryview(a.reshape(-1)).cast("B") if a.size else memoryview(b"")  # type: ignore[arg-type]
        packed.append([name, dtype, list(a.shape), data])
    return packed


_WIRE_NAMES = {dt: name for name, dt in ALLOWED_DTYPES.items()} | {
    dt.newbyteorder(">"): name for name, dt in ALLOWED_DTYPES.items()}


def decode(body: bytes | memoryview, max_bytes: int = DEFAULT_MAX_BYTES, *,
           finite: bool = True) -> Message:
    """Parse and validate a message body.

    Raises ``InvalidMessage`` (and nothing else) when the body is too large, not msgpack,
    not a map, of an unknown schema version or kind, lacks a field, has a field of the wrong
    type, holds a malformed or non-finite tensor, or an out-of-range count. ``finite=False``
    leaves the NaN/Inf check of raw float tensors to the caller, who must make it before the
    values are used (the aggregator's validation does, in the same pass as its range check).
    """
    if len(body) > max_bytes:
        raise InvalidMessage("too-large", f"{len(body)} bytes > limit {max_bytes}")
    try:
        raw = _unpack_map(body, max_bytes)
    except Exception:  # not a well-formed map: the plain parser says what is wrong
        raw = _classify(body, max_bytes)
    _check_version(raw)
    kind = raw.get("kind")
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise InvalidMessage("unknown-kind", f"kind {_show(kind)}")
    try:
        return _build(cls, raw, max_bytes, finite)
    except InvalidMessage:
        raise
    except Exception as exc:  # a gap in the checks above must not take a daemon down
        raise InvalidMessage("bad-value", f"{type(exc).__name__}: {exc}"[:200]) from None


def _unpacker(body: memoryview, at: int, max_bytes: int) -> msgpack.Unpacker:
    return msgpack.Unpacker(_Reader(body, at), read_size=_READ_SIZE,
                            max_buffer_size=max(max_bytes, _READ_SIZE), raw=False,
                            strict_map_key=True, use_list=True, max_bin_len=max_bytes,
                            max_str_len=1 << 20)


_READ_SIZE = 512
"""Bytes msgpack reads ahead of the object it parses; tensor data is never among them."""


class _Reader:
    """The body as a file for ``msgpack.Unpacker``, which copies only what it reads."""

    __slots__ = ("at", "body")

    def __init__(self, body: memoryview, at: int) -> None:
        self.body, self.at = body, at

    def read(self, n: int) -> bytes:
        chunk = self.body[self.at:self.at + n]
        self.at += len(chunk)
        return bytes(chunk)


def _unpack_map(body: bytes | memoryview, max_bytes: int) -> dict[str, Any]:
    """The top-level map, with each tensor's ``bin`` as a view of ``body``, not a copy.

    ``msgpack.unpackb`` hands back every ``bin`` as a new ``bytes``: one more copy of the
    whole model per message. Here msgpack parses everything but the tensors' bins, which are
    located by their headers and sliced out of the body. Any deviation from a well-formed map
    raises, and ``decode`` then lets the plain parser name what is wrong.
    """
    view = memoryview(body).cast("B")
    unpacker, base = _unpacker(view, 0, max_bytes), 0
    raw: dict[str, Any] = {}
    for _ in range(unpacker.read_map_header()):
        key = unpacker.unpack()
        if not isinstance(key, str):
            raise ValueError("map key is not a string")
        if key != "tensors":
            raw[key] = unpacker.unpack()
            continue
        # [[name, dtype, shape, data, ...], ...]: walk the two levels of arrays by hand
        entries = []
        for _ in range(unpacker.read_array_header()):
            entry: list[Any] = []
            for i in range(unpacker.read_array_header()):
                at = base + unpacker.tell()
                # name, dtype and shape come first; a bin there is refused later as a type
                size = _bin_size(view, at) if i >= 3 else None
                if size is None:
                    entry.append(unpacker.unpack())
                    continue
                start = at + _BIN_HEADERS[view[at]]
                if start + size > len(view):
                    raise ValueError("bin runs past the end of the body")
                entry.append(view[start:start + size])
                base = start + size
                unpacker = _unpacker(view, base, max_bytes)
            entries.append(entry)
        raw[key] = entries
    if base + unpacker.tell() != len(view):
        raise ValueError("extra data after the map")
    return raw


_BIN_HEADERS = {0xC4: 2, 0xC5: 3, 0xC6: 5}  # bin 8/16/32: type byte + big-endian length


def _bin_size(view: memoryview, at: int) -> int | None:
    """The length of the ``bin`` starting at ``at``, or ``None`` if something else does."""
    header = _BIN_HEADERS.get(view[at]) if at < len(view) else None
    if header is None:
        return None
    return int.from_bytes(view[at + 1:at + header], "big")


def _classify(body: bytes | memoryview, max_bytes: int) -> dict[str, Any]:
    """Why a body is not a well-formed message map, as the ``InvalidMessage`` to raise."""
    try:
        raw = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True,
                              max_bin_len=max_bytes, max_str_len=1 << 20)
    except Exception as exc:  # msgpack raises many unrelated types for garbage input
        raise InvalidMessage("not-msgpack", f"{type(exc).__name__}: {exc}"[:200]) from None
    if not isinstance(raw, dict):
        raise InvalidMessage("not-a-map", f"top level is {type(raw).__name__}")
    return raw


def _check_version(raw: Mapping[str, Any]) -> None:
    """The schema version must be exactly the integer: not ``true``, ``1.0`` or ``"1"``."""
    v = raw.get("v")
    if type(v) is not int or v != SCHEMA_VERSION:
        raise InvalidMessage("bad-version", f"schema version {_show(v)}, "
                                            f"this build reads {SCHEMA_VERSION}")


def _build(cls: type[Message], raw: dict[str, Any], max_bytes: int, finite: bool = True
           ) -> Message:
    tensors_check: Checker | None = None
    if cls is Update and raw.get("encoding", "float32") != "float32":
        tensors_check = _encoded_checker(raw["encoding"], max_bytes)
    elif not finite:
        tensors_check = _unchecked_tensors
    values: dict[str, Any] = {}
    for f in _SPECS.get(cls) or _fields_of(cls):
        if f.name not in raw:
            if f.required:
                raise InvalidMessage("missing-field", f"{cls.KIND} needs {f.name!r}")
            continue
        check = tensors_check if f.tensors and tensors_check is not None else f.check
        values[f.name] = check(f.name, raw[f.name])
    return cls(**values)


Checker = Callable[[str, Any], Any]
"""Checks one received field value (given the field's name) and returns what to keep."""


def _show(x: Any) -> str:
    """``x`` for an error detail: a repr (no raw newline or control character) cut short."""
    return _SHORT.repr(x)


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = 80
_SHORT.maxlist = _SHORT.maxdict = 8


def _wrong(name: str, want: str, got: Any) -> InvalidMessage:
    return InvalidMessage("wrong-type", f"field {name!r} must be {want}, got {type(got).__name__}")


def _int_in(low: int, high: int, reason: str = "out-of-bounds") -> Checker:
    """An integer in ``low..high`` (msgpack gives ``int`` or ``bool``; a bool is no int)."""
    def check(name: str, x: Any) -> int:
        if type(x) is not int:
            raise _wrong(name, "an integer", x)
        if not low <= x <= high:
            raise InvalidMessage(reason, f"field {name!r} is {_show(x)}, not in {low}..{high}")
        return x
    return check


def _text(name: str, x: Any, limit: int) -> str:
    """A string of at most ``limit`` printable characters (no newline, tab or control)."""
    if type(x) is not str:
        raise _wrong(name, "a string", x)
    if len(x) > limit or not x.isprintable():
        raise InvalidMessage("bad-text", f"field {name!r} must be at most {limit} printable "
                                         f"characters, got {_show(x)}")
    return x


def _text_of(limit: int) -> Checker:
    return functools.partial(_text, limit=limit)


def _party(name: str, x: Any) -> str:
    if type(x) is not str:
        raise _wrong(name, "a string", x)
    if not PARTY_ID.match(x):
        raise InvalidMessage("bad-party", f"party id {_show(x)}: it must be 1-64 letters, "
                                          "digits, '-' or '_'")
    return x


def _encoding(name: str, x: Any) -> str:
    if _text(name, x, bounds.MAX_WORD) not in ENCODINGS:
        raise InvalidMessage("bad-encoding", f"encoding {_show(x)} is not one of "
                                             f"{sorted(ENCODINGS)}")
    return x  # type: ignore[no-any-return]


def _float(name: str, x: Any) -> float:
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        raise _wrong(name, "a number", x)
    if not math.isfinite(x):
        raise InvalidMessage("non-finite", f"field {name!r} is {x}")
    return float(x)


def _bool(name: str, x: Any) -> bool:
    if not isinstance(x, bool):
        raise _wrong(name, "a boolean", x)
    return x


def _secret(name: str, x: Any) -> bytes:
    """Opaque key material (a sealed seed, a signature): bytes of bounded length."""
    if type(x) is not bytes:
        raise _wrong(name, "bytes", x)
    if len(x) > bounds.MAX_SECRET_BYTES:
        raise InvalidMessage("too-large", f"field {name!r} has {len(x)} bytes, more than "
                                          f"{bounds.MAX_SECRET_BYTES}")
    return x


def _list_of(each: Checker) -> Checker:
    """A list of at most ``MAX_MASK_SET`` items, each checked by ``each``."""
    def check(name: str, x: Any) -> list[Any]:
        if not isinstance(x, list):
            raise _wrong(name, "a list", x)
        _entries(name, x, bounds.MAX_MASK_SET)
        return [each(f"{name}[{i}]", v) for i, v in enumerate(x)]
    return check


def _entries(name: str, x: Any, limit: int) -> None:
    """A map's or list's entry count must stay within ``limit``."""
    if len(x) > limit:
        raise InvalidMessage("too-many", f"field {name!r} has {len(x)} entries, more than "
                                         f"{limit}")


def _metrics(name: str, x: Any) -> dict[str, float]:
    if not isinstance(x, dict):
        raise _wrong(name, "a map", x)
    _entries(name, x, bounds.MAX_METRICS)
    # a dict display evaluates each key before its value: the key is checked before it is
    # quoted in the value's error
    return {_text(f"{name} key", k, bounds.MAX_KEY): _float(f"{name}[{k}]", v)
            for k, v in x.items()}


def _scalar(name: str, x: Any, text_limit: int) -> Any:
    """A bool, an integer within +-MAX_INT, a finite float or a bounded printable string."""
    t = type(x)
    if t is bool:
        return x
    if t is int:
        if not -MAX_INT <= x <= MAX_INT:
            raise InvalidMessage("out-of-bounds", f"field {name!r} is {x}, beyond +-{MAX_INT}")
        return x
    if t is float:
        return _float(name, x)
    if t is str:
        return _text(name, x, text_limit)
    raise _wrong(name, "a scalar", x)


def _settings(name: str, x: Any) -> Settings:
    if not isinstance(x, dict):
        raise _wrong(name, "a map", x)
    _entries(name, x, bounds.MAX_SETTINGS)
    out: Settings = {}
    for k, v in x.items():
        key = _text(f"{name} key", k, bounds.MAX_KEY)
        out[key] = _scalar(f"{name}[{key}]", v, bounds.MAX_SETTING_TEXT)
    return out


def _report(name: str, x: Any) -> Document:
    if not isinstance(x, dict):
        raise _wrong(name, "a map", x)
    budget = [bounds.MAX_DOCUMENT_ITEMS]
    return _document(name, x, 0, budget)  # type: ignore[no-any-return]


def _document(name: str, x: Any, depth: int, budget: list[int]) -> Any:
    """Plain data: maps with string keys, lists, None and scalars, within the document's
    bounds (``budget[0]`` is how many more values it may hold)."""
    if depth > bounds.MAX_DOCUMENT_DEPTH:
        raise InvalidMessage("bad-value", f"field {name!r} nests too deeply")
    budget[0] -= 1
    if budget[0] < 0:
        raise InvalidMessage("too-many", f"field {name!r} holds more than "
                                         f"{bounds.MAX_DOCUMENT_ITEMS} values")
    if isinstance(x, dict):
        return {_text(f"{name} key", k, bounds.MAX_DOCUMENT_TEXT):
                _document(name, v, depth + 1, budget) for k, v in x.items()}
    if isinstance(x, list):
        return [_document(name, v, depth + 1, budget) for v in x]
    if x is None:
        return x
    return _scalar(name, x, bounds.MAX_DOCUMENT_TEXT)


def _elements(shape: list[int] | tuple[int, ...]) -> int:
    """The elements a shape describes, a zero dimension counted as one (so it cannot hide
    absurd other dimensions)."""
    return math.prod(d or 1 for d in shape)


def _tensor_name(tname: str) -> None:
    if len(tname) > bounds.MAX_TENSOR_NAME or not tname.isprintable():
        raise InvalidMessage("bad-text", f"tensor name {_show(tname)} must be at most "
                                         f"{bounds.MAX_TENSOR_NAME} printable characters")


def _tensors(name: str, x: Any, finite: bool = True) -> Tensors:
    if not isinstance(x, list):
        raise _wrong(name, "a list of [name, dtype, shape, bytes]", x)
    _entries(name, x, bounds.MAX_TENSORS)
    out: Tensors = {}
    for item in x:
        if not (isinstance(item, list) and len(item) == 4):
            raise InvalidMessage("bad-tensor", "each tensor must be [name, dtype, shape, bytes]")
        tname, dtype_name, shape, data = item
        if not isinstance(tname, str) or tname in out:
            raise InvalidMessage("bad-tensor", f"tensor name {_show(tname)} is not a unique "
                                               "string")
        _tensor_name(tname)
        if not isinstance(dtype_name, str) or dtype_name not in ALLOWED_DTYPES:
            raise InvalidMessage("bad-dtype", f"tensor {tname!r} has dtype {_show(dtype_name)}")
        if not (isinstance(shape, list) and len(shape) <= bounds.MAX_NDIM and all(
                type(d) is int and 0 <= d <= bounds.MAX_DIM for d in shape)):
            raise InvalidMessage("bad-shape", f"tensor {tname!r} has shape {_show(shape)}")
        count = math.prod(shape)
        if (count or _elements(shape)) > bounds.MAX_TENSOR_ELEMENTS:
            raise InvalidMessage("bad-shape", f"tensor {tname!r} has shape {shape}: more "
                                              f"than {bounds.MAX_TENSOR_ELEMENTS} elements")
        if not isinstance(data, (bytes, memoryview)):
            raise InvalidMessage("bad-tensor", f"tensor {tname!r} data is not bytes")
        dtype = ALLOWED_DTYPES[dtype_name]
        if count * dtype.itemsize != len(data):
            raise InvalidMessage("bad-shape", f"tensor {tname!r}: {len(data)} bytes do not "
                                              f"fill shape {shape} of {dtype_name}")
        try:
            array: NDArray = np.frombuffer(data, dtype=dtype, count=count).reshape(shape)
        except (ValueError, TypeError) as exc:  # e.g. an empty array with absurd dimensions
            raise InvalidMessage("bad-shape", f"tensor {tname!r}: {exc}") from None
        if finite and dtype.kind == "f" and not all_finite(array):
            raise InvalidMessage("non-finite", f"tensor {tname!r} holds NaN or Inf")
        out[tname] = array
    return out


_unchecked_tensors: Checker = functools.partial(_tensors, finite=False)


def all_finite(array: NDArray) -> bool:
    """Whether no element is NaN or infinite, usually in one BLAS pass and no temporary.

    A NaN or infinite element makes the sum of squares NaN or infinite, so a finite sum
    proves every element finite; otherwise (NaN, inf, or float32 overflow from values beyond
    about 1e19) the exact elementwise check, which reads the data twice, decides.
    """
    if array.dtype in (np.float32, np.float64):
        flat = array.reshape(-1)
        if math.isfinite(float(np.dot(flat, flat))):
            return True
    return bool(np.isfinite(array).all())


def _encoded_checker(encoding: Any, max_bytes: int) -> Checker:
    """The checker of an update's tensors in a compressed encoding: they decode to float32.

    The encoding is checked first, since it says how to read the tensors.
    """
    return functools.partial(_encoded_tensors, encoding=_encoding("encoding", encoding),
                             max_bytes=max_bytes)


def _encoded_tensors(name: str, x: Any, *, encoding: str, max_bytes: int) -> Tensors:
    """Dense float32 tensors from compressed entries, at most ``max_bytes`` of them in all
    (what the same update could be in float32), however small the entries are."""
    if not isinstance(x, list):
        raise _wrong(name, f"a list of {encoding} tensor entries", x)
    _entries(name, x, bounds.MAX_TENSORS)
    out: Tensors = {}
    budget = max_bytes
    for item in x:
        tname, array = compression.unpack(encoding, item, budget)
        if tname in out:
            raise InvalidMessage("bad-tensor", f"tensor name {_show(tname)} is not unique")
        _tensor_name(tname)
        if (array.size or _elements(array.shape)) > bounds.MAX_TENSOR_ELEMENTS:
            raise InvalidMessage("bad-shape", f"tensor {tname!r} has shape {array.shape}")
        budget -= array.nbytes
        out[tname] = array
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class _Field:
    """How one field of a kind travels: its name, checker, whether the body must hold it,
    and whether it holds tensors (packed and checked apart from the rest)."""

    name: str
    check: Checker
    required: bool
    tensors: bool


_INT_BOUNDS: dict[tuple[str, str], Checker] = {
    ("update", "seq"): _int_in(0, bounds.MAX_SEQ),
    ("update", "base_version"): _int_in(0, bounds.MAX_VERSION),
    ("update", "num_samples"): _int_in(1, bounds.MAX_SAMPLES, "bad-samples"),
    ("model", "version"): _int_in(0, bounds.MAX_VERSION),
    ("join", "num_samples"): _int_in(1, bounds.MAX_SAMPLES, "bad-samples"),
    # a refusal carries -1 for the version (none released yet) and for both seqs
    ("welcome", "version"): _int_in(-1, bounds.MAX_VERSION),
    ("welcome", "last_seq"): _int_in(-1, bounds.MAX_SEQ),
    ("welcome", "next_seq"): _int_in(-1, bounds.MAX_NEXT_SEQ),
    # -1: the party holds no model yet / the federation stopped before releasing one
    ("heartbeat", "version"): _int_in(-1, bounds.MAX_VERSION),
    ("stop", "version"): _int_in(-1, bounds.MAX_VERSION),
    ("mask-request", "request"): _int_in(0, MAX_INT),
    ("mask-request", "seqs"): _int_in(0, bounds.MAX_SEQ),
    ("mask-request", "weights"): _int_in(1, bounds.MAX_MASK_WEIGHT, "bad-weight"),
    ("mask-request", "length"): _int_in(1, bounds.MAX_MASK_WORDS),
    ("mask-sum", "request"): _int_in(0, MAX_INT),
    ("partial", "number"): _int_in(0, MAX_INT),
    ("partial", "version"): _int_in(0, bounds.MAX_VERSION),
    ("partial", "seqs"): _int_in(0, bounds.MAX_SEQ),
    ("partial", "bases"): _int_in(0, bounds.MAX_VERSION),
    ("partial", "samples"): _int_in(1, bounds.MAX_SAMPLES, "bad-samples"),
    ("taken", "number"): _int_in(0, MAX_INT),
    ("taken", "version"): _int_in(-1, bounds.MAX_VERSION),
    ("taken", "seqs"): _int_in(0, bounds.MAX_SEQ),
}
"""The range of every integer field, by (kind, field)."""

_TEXT_BOUNDS: dict[tuple[str, str], Checker] = {
    ("update", "party"): _party,
    ("update", "encoding"): _encoding,
    ("join", "party"): _party,
    ("join", "software"): _text_of(bounds.MAX_SOFTWARE),
    ("welcome", "party"): _party,
    ("welcome", "reason"): _text_of(bounds.MAX_REASON),
    ("leave", "party"): _party,
    ("leave", "reason"): _text_of(bounds.MAX_REASON),
    ("heartbeat", "party"): _party,
    ("stop", "reason"): _text_of(bounds.MAX_REASON),
    ("query", "what"): _text_of(bounds.MAX_WORD),
    ("mask-request", "parties"): _party,
    ("mask-sum", "reason"): _text_of(bounds.MAX_REASON),
    ("partial", "edge"): _party,
    ("partial", "parties"): _party,
    ("taken", "parties"): _party,
    ("taken", "reasons"): _text_of(bounds.MAX_WORD),
}
"""The checker of every string field, by (kind, field)."""

_TYPE_CHECKERS: tuple[tuple[Any, Checker | None], ...] = (
    (Tensors, _tensors), (Settings, _settings), (Document, _report),
    (dict[str, float], _metrics), (float, _float), (bool, _bool), (bytes, _secret),
    (list[bytes], _list_of(_secret)),
    (int, None), (str, None),  # per field: _INT_BOUNDS, _TEXT_BOUNDS
    (list[int], None), (list[str], None),  # each item: the field's _INT_/_TEXT_BOUNDS
)
"""The checker of each field type the kinds use, matched against the resolved annotation."""


def _spec_of(cls: type[Message]) -> tuple[_Field, ...]:
    """The fields of kind ``cls`` with their checkers, from its resolved type hints (so an
    annotation is a type, not a string to compare); raises ``TypeError`` for a field whose
    type has no checker or whose integer or string has no bound."""
    hints = get_type_hints(cls)
    spec = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        found = [check for t, check in _TYPE_CHECKERS if hint == t]
        if not found:
            raise TypeError(f"{cls.__name__}.{f.name}: no codec checker for type {hint!r}")
        check = found[0]
        if check is None:
            table = _INT_BOUNDS if hint in (int, list[int]) else _TEXT_BOUNDS
            check = table.get((cls.KIND, f.name))
            if check is None:
                raise TypeError(f"{cls.__name__}.{f.name}: no bound in messages.wire.codec")
            if hint in (list[int], list[str]):
                check = _list_of(check)
        required = (f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING)
        spec.append(_Field(f.name, check, required, hint == Tensors))
    return tuple(spec)


_SPECS: dict[type[Message], tuple[_Field, ...]] = {cls: _spec_of(cls) for cls in KINDS.values()}
"""Every kind's fields, resolved once: ``encode`` and ``decode`` run per message."""


def _fields_of(cls: type[Message]) -> tuple[_Field, ...]:
    """The fields of a class that is not among ``KINDS`` (a test's), resolved on first use."""
    spec = _SPECS[cls] = _spec_of(cls)
    return spec
