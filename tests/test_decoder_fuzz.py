"""Property-based fuzzing: whatever arrives, the decoder only raises InvalidMessage."""

from __future__ import annotations

import contextlib
import json
import os

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from messages.errors import InvalidMessage
from messages.wire.codec import SCHEMA_VERSION, decode, encode
from messages.wire.kinds import KINDS

# 10,000 examples in CI (the bar); fewer locally keeps the loop fast.
EXAMPLES = 10_000 if os.environ.get("CI") else 1_000
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
           | st.text(max_size=20) | st.binary(max_size=64))
values = st.recursive(scalars, lambda children: st.lists(children, max_size=5)
                      | st.dictionaries(st.text(max_size=10), children, max_size=5),
                      max_leaves=20)
field_names = st.sampled_from(sorted({f for cls in KINDS.values()
                                      for f in cls.__dataclass_fields__} | {"v", "kind"}))
tensor = st.lists(st.one_of(st.text(max_size=8), st.sampled_from(["float32", "int8", "x"]),
                            st.lists(st.integers(-3, 5), max_size=4), st.binary(max_size=32)),
                  min_size=0, max_size=5)


def try_decode(body: bytes) -> None:
    with contextlib.suppress(InvalidMessage):
        decode(body)


@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes_only_raise_invalid_message(body: bytes) -> None:
    try_decode(body)


@FUZZ
@given(values)
def test_arbitrary_msgpack_values_only_raise_invalid_message(value: object) -> None:
    try_decode(msgpack.packb(value, use_bin_type=True))


# A quarter of the budget: each example draws a whole message's worth of nested values (about
# 24 ms each, 244 s of a CI run at 10,000); arbitrary bytes and msgpack keep the full budget.
@settings(FUZZ, max_examples=max(250, EXAMPLES // 4))
@given(st.sampled_from(sorted(KINDS)), st.dictionaries(field_names, values | st.lists(tensor)))
def test_maps_that_look_like_messages_only_raise_invalid_message(
        kind: str, fields: dict[str, object]) -> None:
    """... and whatever of them decodes stays within the bounds: it re-encodes, and its
    fields other than tensors pack as msgpack and dump as strict JSON (no NaN)."""
    body = {"v": SCHEMA_VERSION, "kind": kind, **fields}
    try:
        msg = decode(msgpack.packb(body, use_bin_type=True))
    except InvalidMessage:
        return
    assert kind == decode(encode(msg)).KIND
    plain = {name: getattr(msg, name) for name in msg.__dataclass_fields__ if name != "tensors"}
    msgpack.packb(plain)
    json.dumps(plain, allow_nan=False)


def reference_decode(body: bytes) -> object:
    """What ``decode`` must agree with: msgpack's own parser (which copies every bin) and
    the same checks, without the copy-free walk over the tensors."""
    from messages.wire.codec import KINDS as CODEC_KINDS
    from messages.wire.codec import _build, _check_version, _classify

    try:
        raw = _classify(body, 1 << 20)
        _check_version(raw)
        cls = CODEC_KINDS.get(raw.get("kind")) if isinstance(raw.get("kind"), str) else None
        return "unknown-kind" if cls is None else _build(cls, raw, 1 << 20)
    except InvalidMessage as exc:
        return exc.reason
    except Exception:  # the daemon's decode maps this gap to bad-value
        return "bad-value"


def outcome(body: bytes) -> object:
    try:
        return decode(body, 1 << 20)
    except InvalidMessage as exc:
        return exc.reason


def same(a: object, b: object) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    assert type(a) is type(b)
    fields = a.__dataclass_fields__  # type: ignore[attr-defined]
    for name in fields:
        x, y = getattr(a, name), getattr(b, name)
        if name == "tensors":
            if list(x) != list(y) or not all(
                    x[k].dtype == y[k].dtype and x[k].shape == y[k].shape
                    and x[k].tobytes() == y[k].tobytes() for k in x):
                return False
        elif name == "sent_at" and x > 1e9 and y > 1e9:
            continue  # both missing (a damaged key): each took the clock as its default
        elif x != y:
            return False
    return True


@FUZZ
@given(st.lists(tensor, max_size=4), st.integers(0, 400), st.integers(0, 255),
       st.sampled_from(["flip", "cut", "append"]))
def test_the_copy_free_walk_agrees_with_msgpacks_parser(
        tensors: list[list[object]], where: int, byte: int, how: str) -> None:
    """Valid and damaged update bodies: same message, or the same reason, either way."""
    import numpy as np

    body = msgpack.packb({"v": SCHEMA_VERSION, "kind": "update", "party": "p", "seq": 0,
                          "base_version": 0, "num_samples": 1, "sent_at": 1.0,
                          "tensors": [*tensors, ["w", "float32", [2],
                                                 np.ones(2, np.float32).tobytes()]]},
                         use_bin_type=True)
    data = bytearray(body)
    at = where % len(data)
    if how == "flip":
        data[at] = byte
    elif how == "cut":
        del data[at:]
    else:
        data += bytes([byte])
    assert same(outcome(bytes(data)), reference_decode(bytes(data)))
    assert same(outcome(body), reference_decode(body))
