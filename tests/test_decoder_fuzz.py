"""Property-based fuzzing: whatever arrives, the decoder only raises InvalidMessage."""

from __future__ import annotations

import contextlib
import os

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from messages.codec import SCHEMA_VERSION, decode
from messages.errors import InvalidMessage
from messages.kinds import KINDS

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


@FUZZ
@given(st.sampled_from(sorted(KINDS)), st.dictionaries(field_names, values | st.lists(tensor)))
def test_maps_that_look_like_messages_only_raise_invalid_message(
        kind: str, fields: dict[str, object]) -> None:
    body = {"v": SCHEMA_VERSION, "kind": kind, **fields}
    try_decode(msgpack.packb(body, use_bin_type=True))
