"""The msgpack codec: round trips, zero-copy decode, and validation errors."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from messages.codec import SCHEMA_VERSION, decode, encode
from messages.errors import InvalidMessage
from messages.kinds import Heartbeat, Join, Leave, Message, Model, Stop, Update, Welcome

RNG = np.random.default_rng(0)


def tensors(dtype: str = "float32") -> dict[str, np.ndarray]:
    return {
        "dense/kernel": (RNG.standard_normal((3, 4)) * 10).astype(dtype),
        "dense/bias": np.arange(4).astype(dtype),
        "scalar": np.array(7, dtype=dtype),
        "empty": np.zeros((0, 5), dtype=dtype),
    }


ALL_KINDS: list[Message] = [
    Update("p1", 3, 2, 600, tensors(), {"loss": 0.5}),
    Model(9, tensors(), created_at=1.5),
    Join("p1", 600, tensors(), software="dfl/0.1"),
    Welcome("p1", True, "", 4, 2, 2**32, {"local_steps": 10, "sync": False, "lr": 0.001},
            tensors()),
    Leave("p1", "SIGTERM"),
    Heartbeat("p1", 4),
    Stop(12, "target reached"),
]


def assert_same(a: Message, b: Message) -> None:
    assert type(a) is type(b)
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, dict) and x and isinstance(next(iter(x.values())), np.ndarray):
            assert list(x) == list(y)
            for k in x:
                assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape
                np.testing.assert_array_equal(x[k], y[k])
        else:
            assert x == y


@pytest.mark.parametrize("msg", ALL_KINDS, ids=lambda m: m.KIND)
def test_every_message_kind_survives_a_round_trip(msg: Message) -> None:
    assert_same(decode(encode(msg)), msg)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_tensors_of_each_dtype_round_trip_with_scalars_and_empty_shapes(dtype: str) -> None:
    msg = Model(1, tensors(dtype))
    out = decode(encode(msg))
    assert isinstance(out, Model)
    assert out.tensors["scalar"].shape == () and out.tensors["empty"].shape == (0, 5)
    assert_same(out, msg)


def test_non_contiguous_and_big_endian_arrays_are_sent_as_little_endian_values() -> None:
    a = np.arange(12, dtype=">f4").reshape(3, 4).T
    out = decode(encode(Model(1, {"a": a})))
    assert isinstance(out, Model)
    np.testing.assert_array_equal(out.tensors["a"], a)
    assert out.tensors["a"].dtype == np.dtype("<f4")


def test_decode_wraps_the_received_bytes_without_copying_them() -> None:
    body = encode(Model(1, {"w": np.ones(1000, np.float32), "b": np.zeros(3, np.float32)}))
    out = decode(body)
    assert isinstance(out, Model)
    for array in out.tensors.values():
        assert not array.flags.owndata and not array.flags.writeable
        # a view of the received body itself: msgpack's copy of each bin is skipped
        assert np.shares_memory(array, np.frombuffer(body, np.uint8))
    assert (out.tensors["w"] == 1).all() and (out.tensors["b"] == 0).all()


@pytest.mark.parametrize("size", [0, 1, 255, 256, 65535, 65536, 70000])
def test_zero_copy_decode_reads_every_bin_width(size: int) -> None:
    """bin 8, 16 and 32 headers, and tensors small enough to sit inside msgpack's read-ahead,
    decode to the values the plain parser gives."""
    tensors = {f"t{i}": np.arange(size + i, dtype=np.float32) for i in range(3)}
    body = msgpack.packb({"v": SCHEMA_VERSION, "kind": "update", "party": "p", "seq": 0,
                          "base_version": 0, "num_samples": 10,
                          "tensors": [[k, "float32", [a.size], a.tobytes()]
                                      for k, a in tensors.items()],
                          "metrics": {"loss": 0.5}})
    out = decode(body)
    assert isinstance(out, Update) and out.metrics == {"loss": 0.5}
    for k, a in tensors.items():
        np.testing.assert_array_equal(out.tensors[k], a)


def test_trailing_bytes_after_a_valid_update_are_refused() -> None:
    body = encode(Update("p", 0, 0, 10, {"w": np.ones(4, np.float32)}))
    with pytest.raises(InvalidMessage) as info:
        decode(body + b"\x00")
    assert info.value.reason == "not-msgpack"


@pytest.mark.parametrize("cut", [1, 5, 17, 40])
def test_a_body_cut_inside_a_tensor_is_refused(cut: int) -> None:
    body = encode(Update("p", 0, 0, 10, {"w": np.ones(16, np.float32)}))
    with pytest.raises(InvalidMessage) as info:
        decode(body[:-cut])
    assert info.value.reason == "not-msgpack"


def raw(**fields: Any) -> bytes:
    body = {"v": SCHEMA_VERSION, "kind": "heartbeat", "party": "p", "version": 1}
    body.update(fields)
    return msgpack.packb({k: v for k, v in body.items() if v is not ...})  # type: ignore[no-any-return]


def update_body(**fields: Any) -> bytes:
    body: dict[str, Any] = {"v": SCHEMA_VERSION, "kind": "update", "party": "p", "seq": 0,
                            "base_version": 0, "num_samples": 10,
                            "tensors": [["w", "float32", [2], np.ones(2, np.float32).tobytes()]]}
    body.update(fields)
    return msgpack.packb({k: v for k, v in body.items() if v is not ...})  # type: ignore[no-any-return]


NAN = np.array([1, np.nan], np.float32).tobytes()
INF = np.array([np.inf, 1], np.float32).tobytes()


@pytest.mark.parametrize(("body", "reason"), [
    (b"\xc1\xc1not msgpack", "not-msgpack"),
    (b"", "not-msgpack"),
    (msgpack.packb([1, 2, 3]), "not-a-map"),
    (raw(v=99), "bad-version"),
    (raw(v=...), "bad-version"),
    (raw(kind="teleport"), "unknown-kind"),
    (raw(party=...), "missing-field"),
    (raw(version="seven"), "wrong-type"),
    (raw(version=True), "wrong-type"),
    (update_body(tensors=[["w", "complex64", [2], b"\0" * 16]]), "bad-dtype"),
    (update_body(tensors=[["w", "float32", [3], b"\0" * 8]]), "bad-shape"),
    (update_body(tensors=[["w", "float32", [-2], b""]]), "bad-shape"),
    (update_body(tensors=[["w", "float32", [0] + [2**31 - 1] * 4, b""]]), "bad-shape"),
    (update_body(tensors=[["w", "float32", [2], NAN]]), "non-finite"),
    (update_body(tensors=[["w", "float32", [2], INF]]), "non-finite"),
    (update_body(tensors=[["w", "float32", [2]]]), "bad-tensor"),
    (update_body(tensors=[["w", "float32", [2], "text"]]), "bad-tensor"),
    (update_body(tensors={"w": 1}), "wrong-type"),
    (update_body(num_samples=-5), "bad-samples"),
    (update_body(num_samples=10**12), "bad-samples"),
    (update_body(seq=-1), "bad-value"),
    (update_body(encoding="zstd"), "bad-encoding"),
    (update_body(metrics={"loss": float("nan")}), "non-finite"),
    (update_body(party=""), "bad-party"),
])
def test_invalid_bodies_raise_invalid_message_with_a_reason(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        decode(body)
    assert info.value.reason == reason


def test_a_body_over_the_size_limit_is_refused_before_parsing() -> None:
    with pytest.raises(InvalidMessage) as info:
        decode(encode(Heartbeat("p", 1)), max_bytes=10)
    assert info.value.reason == "too-large"


def test_unknown_extra_fields_are_ignored_for_forward_compatibility() -> None:
    msg = decode(raw(future_field=[1, 2]))
    assert msg == Heartbeat("p", 1, sent_at=msg.sent_at)  # type: ignore[union-attr]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_non_finite_values_are_refused_in_every_float_dtype(bad: float, dtype: type) -> None:
    values = np.ones(5000, dtype)
    values[4321] = bad
    with pytest.raises(InvalidMessage) as info:
        decode(encode(Model(1, {"w": values})))
    assert info.value.reason == "non-finite"


def test_huge_finite_values_are_not_taken_for_infinite() -> None:
    """Their float32 sum of squares overflows; the exact check must still accept them."""
    values = np.full(5000, 3e38, np.float32)
    out = decode(encode(Model(1, {"w": values})))
    assert isinstance(out, Model) and (out.tensors["w"] == values).all()
