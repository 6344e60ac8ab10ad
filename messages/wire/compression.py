"""Compact encodings of a weight delta on the wire: float16, int8 and top-k (numpy only).

An ``Update`` names its encoding; each tensor entry then carries that encoding's fields in
place of the raw float32 buffer (all buffers little-endian, as everywhere on the wire):

==========  =========================================================  ==================
encoding    entry                                                      bytes per element
==========  =========================================================  ==================
float32     ``[name, dtype, shape, data]`` (unchanged, any dtype)      4
float16     ``[name, "float16", shape, float16 data]``                 2
int8        ``[name, "int8", shape, int8 codes, scale]``               1
topk        ``[name, "float32", shape, float32 values, uint32 idx]``   8 per kept entry
==========  =========================================================  ==================

int8 is symmetric with one scale per tensor: ``scale = max|x| / 127`` (a float32 value,
sent as a msgpack float) and ``code = round(x / scale)`` in ``[-127, 127]``, so the error
per element is at most ``scale / 2``. topk keeps the ``round(fraction * size)`` (at least
one) entries of largest magnitude, at their flat C-order positions, in increasing order.

A receiver turns every entry back into a dense float32 tensor before anything else sees it
(``unpack``), so validation, strategies and checkpoints only ever meet plain float32
deltas. ``unpack`` trusts nothing: a top-k entry is only a few bytes for any claimed shape,
so the dense size it would allocate is charged against the caller's byte budget first.
What a lossy encoding drops is the sender's business (``worker.compression`` carries it
into the next update).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

from messages.errors import InvalidMessage
from messages.types import NDArray

Encoding = Literal["float32", "float16", "int8", "topk"]
ENCODINGS: tuple[str, ...] = get_args(Encoding)
DEFAULT_TOPK_FRACTION = 0.01

WIRE_DTYPES: dict[str, np.dtype[Any]] = {
    "float16": np.dtype("<f2"), "int8": np.dtype("i1"), "topk": np.dtype("<f4"),
}
"""The dtype of each compressed encoding's data buffer (the entry's dtype field)."""
INDEX_DTYPE = np.dtype("<u4")
FLOAT16_MAX = float(np.finfo(np.float16).max)
MAX_SCALE = float(np.finfo(np.float32).max) / 128
"""Larger int8 scales could overflow float32 when dequantized (127 codes times the scale)."""
_DENSE = np.dtype("<f4")


@dataclass(frozen=True, slots=True)
class Packed:
    """One tensor of a delta as an encoding sends it; ``dense()`` is what a receiver gets.

    ``data`` holds the float32 or float16 values, the int8 codes (with ``scale``), or the
    kept top-k values at the flat positions ``indices``.
    """

    encoding: str
    shape: tuple[int, ...]
    data: NDArray
    scale: float = 0.0
    indices: NDArray | None = None

    def dense(self) -> NDArray:
        """The float32 tensor this stands for (a new array; a view for float32)."""
        if self.encoding == "float32":
            return self.data.reshape(self.shape)
        if self.encoding == "float16":
            return self.data.astype(np.float32).reshape(self.shape)
        if self.encoding == "int8":
            return np.multiply(self.data, np.float32(self.scale),
                               dtype=np.float32).reshape(self.shape)
        out = np.zeros(math.prod(self.shape), np.float32)
        out[self.indices] = self.data
        return out.reshape(self.shape)

    def entry(self, name: str) -> list[Any]:
        """The msgpack entry of this tensor (buffers are passed without a copy)."""
        fields: list[Any] = [name, self.data.dtype.name, list(self.shape), self.data.data]
        if self.encoding == "int8":
            fields.append(float(self.scale))
        elif self.encoding == "topk":
            assert self.indices is not None
            fields.append(self.indices.data)
        return fields

    @property
    def nbytes(self) -> int:
        """Tensor bytes on the wire (without msgpack's few bytes of framing)."""
        return self.data.nbytes + (self.indices.nbytes if self.indices is not None else 0)


def topk_count(size: int, fraction: float) -> int:
    """How many entries top-k keeps of a tensor of ``size``: ``round(fraction * size)``,
    at least one (a tensor that never sends anything would never learn), at most all."""
    return 0 if size == 0 else min(size, max(1, round(fraction * size)))


def pack(array: NDArray, encoding: str,
         topk_fraction: float = DEFAULT_TOPK_FRACTION) -> Packed:
    """Encode one delta tensor (cast to float32 first); ``ValueError`` for an unknown
    encoding, a fraction outside (0, 1], or a top-k tensor of 2**32 elements or more.

    Non-finite values are not hidden: they travel (NaN top-k values, a NaN int8 scale) so
    that the receiver rejects the update as it would the float32 one.
    """
    x = np.asarray(array, dtype=_DENSE)
    shape = tuple(int(d) for d in x.shape)
    flat = x.reshape(-1)
    if encoding == "float32":
        return Packed(encoding, shape, np.ascontiguousarray(flat))
    if encoding == "float16":
        # beyond float16's range a cast gives inf; the clipped part is a sender's residual
        return Packed(encoding, shape, np.clip(flat, -FLOAT16_MAX, FLOAT16_MAX).astype("<f2"))
    if encoding == "int8":
        return _pack_int8(flat, shape)
    if encoding == "topk":
        if not 0 < topk_fraction <= 1:
            raise ValueError(f"top-k fraction {topk_fraction!r} is not in (0, 1]")
        if flat.size >= 2**32:
            raise ValueError(f"a tensor of {flat.size} elements is too large for uint32 indices")
        k = topk_count(flat.size, topk_fraction)
        if k < flat.size:
            idx = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:]
            idx.sort()
        else:
            idx = np.arange(flat.size)
        return Packed(encoding, shape, flat[idx], indices=idx.astype(INDEX_DTYPE))
    raise ValueError(f"unknown encoding {encoding!r}; one of {', '.join(ENCODINGS)}")


def _pack_int8(flat: NDArray, shape: tuple[int, ...]) -> Packed:
    if flat.size == 0:
        return Packed("int8", shape, np.zeros(0, np.int8), scale=0.0)
    lo, hi = float(flat.min()), float(flat.max())  # no full-size |x| temporary
    peak = math.nan if math.isnan(lo) or math.isnan(hi) else max(-lo, hi)
    scale = np.float32(peak) / np.float32(127)
    if not (math.isfinite(scale) and scale > 0):  # zeros, or NaN/inf sent as the scale
        return Packed("int8", shape, np.zeros(flat.size, np.int8), scale=float(scale))
    codes = np.rint(flat / scale)
    np.clip(codes, -127, 127, out=codes)
    return Packed("int8", shape, codes.astype(np.int8), scale=float(scale))


def unpack(encoding: str, item: Any, budget: int) -> tuple[str, NDArray]:
    """Validate one received entry of a compressed ``encoding``; its name and dense tensor.

    ``budget`` is how many bytes of dense float32 the caller still accepts: a claimed
    shape beyond it is refused before anything is allocated. Raises ``InvalidMessage``
    (and nothing else) with the reason ``bad-tensor``, ``bad-dtype``, ``bad-shape``,
    ``too-large``, ``bad-scale``, ``bad-index``, ``bad-value`` or ``non-finite``.
    """
    want = 5 if encoding in ("int8", "topk") else 4
    if not (isinstance(item, list) and len(item) == want):
        extra = {"int8": ", scale", "topk": ", indices"}.get(encoding, "")
        raise InvalidMessage("bad-tensor", f"each {encoding} tensor must be "
                                           f"[name, dtype, shape, data{extra}]")
    name, dtype_name, shape, data = item[:4]
    if not isinstance(name, str):
        raise InvalidMessage("bad-tensor", f"tensor name {name!r} is not a string")
    dtype = WIRE_DTYPES[encoding]
    if dtype_name != dtype.name:
        raise InvalidMessage("bad-dtype", f"{encoding} tensor {name!r} has dtype "
                                          f"{dtype_name!r}, not {dtype.name}")
    if not (isinstance(shape, list) and len(shape) <= 32 and all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)):
        raise InvalidMessage("bad-shape", f"tensor {name!r} has shape {shape!r}")
    count = math.prod(shape)
    if count * _DENSE.itemsize > budget:
        raise InvalidMessage("too-large", f"tensor {name!r} of shape {shape} decodes to more "
                                          f"than the {budget} bytes left of the limit")
    if not isinstance(data, (bytes, memoryview)):
        raise InvalidMessage("bad-tensor", f"tensor {name!r} data is not bytes")
    dims = tuple(shape)
    if encoding == "topk":
        return name, _unpack_topk(name, dims, count, data, item[4])
    if len(data) != count * dtype.itemsize:
        raise InvalidMessage("bad-shape", f"tensor {name!r}: {len(data)} bytes do not fill "
                                          f"shape {shape} of {dtype.name}")
    values = np.frombuffer(data, dtype=dtype)
    if encoding == "float16":
        if not np.isfinite(values).all():
            raise InvalidMessage("non-finite", f"tensor {name!r} holds NaN or Inf")
        return name, _dense(name, Packed(encoding, dims, values))
    scale = item[4]
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool)
            and 0 <= scale <= MAX_SCALE):  # also refuses NaN, which compares false
        raise InvalidMessage("bad-scale", f"tensor {name!r} has int8 scale {scale!r}: it must "
                                          f"be a number in [0, {MAX_SCALE:.3g}]")
    if values.size and int(values.min()) < -127:
        raise InvalidMessage("bad-value", f"tensor {name!r} holds the int8 code -128 "
                                          "(codes are symmetric, -127..127)")
    return name, _dense(name, Packed(encoding, dims, values, scale=float(np.float32(scale))))


def _unpack_topk(name: str, shape: tuple[int, ...], count: int, data: bytes | memoryview,
                 index_data: Any) -> NDArray:
    if not isinstance(index_data, (bytes, memoryview)):
        raise InvalidMessage("bad-tensor", f"tensor {name!r} indices are not bytes")
    if len(data) % 4 or len(index_data) != len(data):
        raise InvalidMessage("bad-shape", f"tensor {name!r}: {len(data)} bytes of values and "
                                          f"{len(index_data)} bytes of indices do not pair up")
    k = len(data) // 4
    if k > count:
        raise InvalidMessage("bad-shape", f"tensor {name!r}: {k} values for {count} elements")
    indices = np.frombuffer(index_data, dtype=INDEX_DTYPE)
    if k and int(indices[-1]) >= count:  # increasing (checked next), so the last is the max
        raise InvalidMessage("bad-index", f"tensor {name!r}: index {int(indices[-1])} is out "
                                          f"of range for {count} elements")
    if k > 1 and not (indices[1:] > indices[:-1]).all():
        raise InvalidMessage("bad-index", f"tensor {name!r}: indices are not strictly "
                                          "increasing (unsorted or repeated)")
    values = np.frombuffer(data, dtype=WIRE_DTYPES["topk"])
    if not np.isfinite(values).all():
        raise InvalidMessage("non-finite", f"tensor {name!r} holds NaN or Inf")
    return _dense(name, Packed("topk", shape, values, indices=indices))


def _dense(name: str, packed: Packed) -> NDArray:
    try:
        return packed.dense()
    except ValueError as exc:  # e.g. an empty tensor with absurd dimensions
        raise InvalidMessage("bad-shape", f"tensor {name!r}: {exc}") from None
