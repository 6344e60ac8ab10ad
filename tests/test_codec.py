"""The msgpack codec: round trips, zero-copy decode, and validation errors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar, get_type_hints

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from messages.errors import InvalidMessage
from messages.types import Settings, Tensors
from messages.wire import bounds
from messages.wire.codec import SCHEMA_VERSION, decode, encode
from messages.wire.kinds import KINDS, Heartbeat, Join, Leave, Message, Model, Stop, Update, Welcome

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
    (update_body(seq=-1), "out-of-bounds"),
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


# -- bounds: every integer, string, float and collection a message carries -------------------
# (messages.wire.bounds says why each bound; here each is probed just inside and just outside)

W = ["w", "float32", [2], np.ones(2, np.float32).tobytes()]
BASE: dict[str, dict[str, Any]] = {
    "update": {"party": "p", "seq": 0, "base_version": 0, "num_samples": 10, "tensors": [W],
               "metrics": {"loss": 0.5}, "encoding": "float32", "sent_at": 1.0},
    "model": {"version": 0, "tensors": [W], "created_at": 1.0},
    "join": {"party": "p", "num_samples": 10, "tensors": [W], "software": "dfl/0.1",
             "sent_at": 1.0},
    "welcome": {"party": "p", "accepted": True, "reason": "", "version": 0, "last_seq": -1,
                "next_seq": bounds.SEQ_RANGE, "settings": {"local_steps": 10}, "tensors": []},
    "leave": {"party": "p", "reason": "SIGTERM"},
    "heartbeat": {"party": "p", "version": 0, "sent_at": 1.0},
    "stop": {"version": 0, "reason": "target reached"},
    "query": {"what": "status"},
    "report": {"data": {"version": 1, "parties": [{"party": "p", "accuracy": None}]}},
    "mask-request": {"request": 0, "parties": ["a", "b", "c"], "seqs": [1, 2, 3],
                     "weights": [1, 2, 16], "sealed": [bytes(80)] * 3,
                     "signatures": [bytes(64)] * 3, "length": 10},
    "mask-sum": {"request": 0, "accepted": True, "reason": "", "tensors": [W]},
    "partial": {"edge": "e", "number": 0, "version": 3, "parties": ["a", "b"], "seqs": [1, 2],
                "bases": [2, 3], "samples": [10, 20], "weight": 30.0, "tensors": [W]},
    "taken": {"number": 0, "accepted": False, "version": 3, "parties": ["a"], "seqs": [1],
              "reasons": ["duplicate"]},
}


def body_of(kind: str, v: Any = SCHEMA_VERSION, **fields: Any) -> bytes:
    body = {"v": v, "kind": kind, **BASE[kind], **fields}
    return msgpack.packb({k: x for k, x in body.items() if x is not ...},  # type: ignore[no-any-return]
                         use_bin_type=True)


def dec(kind: str, **fields: Any) -> Any:
    """The message a body of ``kind`` with ``fields`` decodes to."""
    return decode(body_of(kind, **fields))


def reason_of(body: bytes) -> str:
    with pytest.raises(InvalidMessage) as info:
        decode(body)
    return info.value.reason


INTS = [  # kind, field, lowest, highest, reason outside
    ("update", "seq", 0, bounds.MAX_SEQ, "out-of-bounds"),
    ("update", "base_version", 0, bounds.MAX_VERSION, "out-of-bounds"),
    ("update", "num_samples", 1, bounds.MAX_SAMPLES, "bad-samples"),
    ("model", "version", 0, bounds.MAX_VERSION, "out-of-bounds"),
    ("join", "num_samples", 1, bounds.MAX_SAMPLES, "bad-samples"),
    ("welcome", "version", -1, bounds.MAX_VERSION, "out-of-bounds"),
    ("welcome", "last_seq", -1, bounds.MAX_SEQ, "out-of-bounds"),
    ("welcome", "next_seq", -1, bounds.MAX_NEXT_SEQ, "out-of-bounds"),
    ("heartbeat", "version", -1, bounds.MAX_VERSION, "out-of-bounds"),
    ("stop", "version", -1, bounds.MAX_VERSION, "out-of-bounds"),
    ("mask-request", "request", 0, bounds.MAX_INT, "out-of-bounds"),
    ("mask-request", "length", 1, bounds.MAX_MASK_WORDS, "out-of-bounds"),
    ("mask-sum", "request", 0, bounds.MAX_INT, "out-of-bounds"),
    ("partial", "number", 0, bounds.MAX_INT, "out-of-bounds"),
    ("partial", "version", 0, bounds.MAX_VERSION, "out-of-bounds"),
    ("taken", "number", 0, bounds.MAX_INT, "out-of-bounds"),
    ("taken", "version", -1, bounds.MAX_VERSION, "out-of-bounds"),
]
PARTIES = [("update", "party"), ("join", "party"), ("welcome", "party"), ("leave", "party"),
           ("heartbeat", "party"), ("partial", "edge")]
TEXTS = [("join", "software", bounds.MAX_SOFTWARE), ("welcome", "reason", bounds.MAX_REASON),
         ("leave", "reason", bounds.MAX_REASON), ("stop", "reason", bounds.MAX_REASON),
         ("query", "what", bounds.MAX_WORD), ("mask-sum", "reason", bounds.MAX_REASON)]
FLOATS = [("update", "sent_at"), ("model", "created_at"), ("join", "sent_at"),
          ("heartbeat", "sent_at"), ("partial", "weight")]


def fields_of_type(t: type) -> set[tuple[str, str]]:
    return {(kind, name) for kind, cls in KINDS.items()
            for name, hint in get_type_hints(cls).items()
            if hint is t and name in cls.__dataclass_fields__}


def test_every_integer_string_and_float_field_is_probed_here() -> None:
    """A new field must come with a bound (the codec refuses to import without one) and
    with its probes in this file."""
    assert fields_of_type(int) == {(k, f) for k, f, *_ in INTS}
    assert fields_of_type(str) == {*PARTIES, *((k, f) for k, f, _ in TEXTS),
                                   ("update", "encoding")}
    assert fields_of_type(float) == set(FLOATS)


def test_the_lists_and_secrets_of_secure_aggregation_are_bounded_item_by_item() -> None:
    """Each item of a mask request's lists is checked like a field of its own; sealed seeds
    and signatures are bytes of bounded length."""
    big = bounds.MAX_MASK_SET + 1
    cases = [
        ({"parties": ["a", "b\n", "c"]}, "bad-party"),
        ({"parties": "abc"}, "wrong-type"),
        ({"parties": ["a"] * big}, "too-many"),
        ({"seqs": [1, -1, 3]}, "out-of-bounds"),
        ({"seqs": [1, True, 3]}, "wrong-type"),
        ({"weights": [1, 0, 1]}, "bad-weight"),
        ({"weights": [1, bounds.MAX_MASK_WEIGHT + 1, 1]}, "bad-weight"),
        ({"sealed": [bytes(80), "x" * 80, bytes(80)]}, "wrong-type"),
        ({"sealed": [bytes(bounds.MAX_SECRET_BYTES + 1)] * 3}, "too-large"),
        ({"signatures": [bytes(64)] * big}, "too-many"),
    ]
    for fields, reason in cases:
        assert reason_of(body_of("mask-request", **fields)) == reason, fields
    for name in ("sealed_seed", "seed_signature"):
        assert reason_of(body_of("update", **{name: "x"})) == "wrong-type"
        assert reason_of(body_of("update", **{name: bytes(257)})) == "too-large"
        assert getattr(dec("update", **{name: bytes(80)}), name) == bytes(80)


def test_the_member_lists_of_partials_and_their_answers_are_bounded_item_by_item() -> None:
    """An edge's partial names up to ``MAX_MASK_SET`` members; every item of its lists, and
    of the root's answer, is checked like a field of its own."""
    big = bounds.MAX_MASK_SET + 1
    for kind, fields, reason in [
        ("partial", {"parties": ["a", "b\n"]}, "bad-party"),
        ("partial", {"parties": ["a"] * big}, "too-many"),
        ("partial", {"seqs": [1, -1]}, "out-of-bounds"),
        ("partial", {"seqs": [1, True]}, "wrong-type"),
        ("partial", {"bases": [0, bounds.MAX_VERSION + 1]}, "out-of-bounds"),
        ("partial", {"samples": [0, 1]}, "bad-samples"),
        ("partial", {"samples": [1, bounds.MAX_SAMPLES + 1]}, "bad-samples"),
        ("partial", {"weight": float("inf")}, "non-finite"),
        ("partial", {"weight": "1"}, "wrong-type"),
        ("taken", {"parties": ["a b"]}, "bad-party"),
        ("taken", {"seqs": [bounds.MAX_SEQ + 1]}, "out-of-bounds"),
        ("taken", {"reasons": ["x" * (bounds.MAX_WORD + 1)]}, "bad-text"),
        ("taken", {"reasons": ["dup\nlicate"]}, "bad-text"),
        ("taken", {"reasons": "duplicate"}, "wrong-type"),
    ]:
        assert reason_of(body_of(kind, **fields)) == reason, (kind, fields)


@pytest.mark.parametrize("kind", sorted(BASE))
def test_the_base_body_of_every_kind_decodes(kind: str) -> None:
    assert kind == dec(kind).KIND


@pytest.mark.parametrize(("kind", "name", "low", "high", "reason"), INTS,
                         ids=[f"{k}.{f}" for k, f, *_ in INTS])
def test_each_integer_decodes_at_its_bounds_and_is_refused_just_outside(
        kind: str, name: str, low: int, high: int, reason: str) -> None:
    for inside in (low, high):
        assert getattr(dec(kind, **{name: inside}), name) == inside
    for outside in (low - 1, high + 1, 2**63, 2**64 - 1, -(2**63)):
        assert reason_of(body_of(kind, **{name: outside})) == reason
    for not_int in (True, False, 1.0, "1", None):
        assert reason_of(body_of(kind, **{name: not_int})) == "wrong-type"


@pytest.mark.parametrize(("kind", "name"), PARTIES, ids=[k for k, _ in PARTIES])
def test_party_ids_are_1_to_64_plain_ascii_characters(kind: str, name: str) -> None:
    for good in ("a" * 64, "0", "A-z_9"):
        assert getattr(dec(kind, **{name: good}), name) == good
    for bad in ("", "a" * 65, "p\n", "p1\nINFO forged log line", "p\r", "p 1", "p.1", "p/1",
                "pé", "\u0661", "p\x00", "p\u2028"):
        assert reason_of(body_of(kind, **{name: bad})) == "bad-party", bad
    assert reason_of(body_of(kind, **{name: 7})) == "wrong-type"


@pytest.mark.parametrize(("kind", "name", "limit"), TEXTS, ids=[f"{k}.{f}" for k, f, _ in TEXTS])
def test_text_fields_are_bounded_and_printable(kind: str, name: str, limit: int) -> None:
    for good in ("", "x" * limit, "é" * limit, "target accuracy 0.98 reached (ü, 日本)"[:limit]):
        assert getattr(dec(kind, **{name: good}), name) == good
    for bad in ("x" * (limit + 1), "a\nb", "a\tb", "\x1b[2J", "a\u2028b", "\x00", "\x7f"):
        assert reason_of(body_of(kind, **{name: bad})) == "bad-text", bad
    assert reason_of(body_of(kind, **{name: b"bytes"})) == "wrong-type"


def test_the_encoding_is_one_of_the_known_words() -> None:
    assert reason_of(body_of("update", encoding="zstd")) == "bad-encoding"
    assert reason_of(body_of("update", encoding="x" * (bounds.MAX_WORD + 1))) == "bad-text"
    assert reason_of(body_of("update", encoding="int8\n")) == "bad-text"
    assert reason_of(body_of("update", encoding=8)) == "wrong-type"


@pytest.mark.parametrize(("kind", "name"), FLOATS, ids=[f"{k}.{f}" for k, f in FLOATS])
def test_float_fields_are_finite_numbers(kind: str, name: str) -> None:
    for good in (0.0, -1.5, 1.7e308, 2**64 - 1):
        assert getattr(dec(kind, **{name: good}), name) == float(good)
    for bad in (float("nan"), float("inf"), float("-inf")):
        assert reason_of(body_of(kind, **{name: bad})) == "non-finite"
    assert reason_of(body_of(kind, **{name: True})) == "wrong-type"


@pytest.mark.parametrize("v", [True, 1.0, "1", b"\x01", 2, 0, -1, None, [1], {"v": 1}, ...])
def test_the_schema_version_must_be_exactly_the_integer(v: Any) -> None:
    assert reason_of(body_of("heartbeat", v=v)) == "bad-version"


def test_metrics_are_bounded_in_entries_keys_and_values() -> None:
    most = {f"m{i}": float(i) for i in range(bounds.MAX_METRICS)}
    assert dec("update", metrics=most).metrics == most
    assert reason_of(body_of("update", metrics={**most, "one more": 1.0})) == "too-many"
    key = "k" * bounds.MAX_KEY
    assert dec("update", metrics={key: 1}).metrics == {key: 1.0}
    for bad_key in (key + "k", "loss\n", "\x1b"):
        assert reason_of(body_of("update", metrics={bad_key: 1.0})) == "bad-text"
    assert reason_of(body_of("update", metrics={"loss": float("inf")})) == "non-finite"
    assert reason_of(body_of("update", metrics={"loss": "low"})) == "wrong-type"
    assert reason_of(body_of("update", metrics=[1.0])) == "wrong-type"


def test_settings_are_bounded_in_entries_keys_and_values() -> None:
    most: dict[str, Any] = {f"s{i}": i for i in range(bounds.MAX_SETTINGS)}
    assert dec("welcome", settings=most).settings == most
    assert reason_of(body_of("welcome", settings={**most, "x": 1})) == "too-many"
    edge = {"big": bounds.MAX_INT, "small": -bounds.MAX_INT, "t": "x" * bounds.MAX_SETTING_TEXT,
            "k" * bounds.MAX_KEY: True, "lr": 1e-3}
    assert dec("welcome", settings=edge).settings == edge
    for bad, reason in [({"big": bounds.MAX_INT + 1}, "out-of-bounds"),
                        ({"small": -bounds.MAX_INT - 1}, "out-of-bounds"),
                        ({"t": "x" * (bounds.MAX_SETTING_TEXT + 1)}, "bad-text"),
                        ({"t": "a\nb"}, "bad-text"),
                        ({"k" * (bounds.MAX_KEY + 1): 1}, "bad-text"),
                        ({"lr": float("nan")}, "non-finite"),
                        ({"l": [1]}, "wrong-type")]:
        assert reason_of(body_of("welcome", settings=bad)) == reason, bad


def empty(name: str) -> list[Any]:
    return [name, "float32", [0], b""]


def test_tensors_per_message_are_bounded() -> None:
    most = [empty(f"t{i}") for i in range(bounds.MAX_TENSORS)]
    assert len(dec("model", tensors=most).tensors) == bounds.MAX_TENSORS
    assert reason_of(body_of("model", tensors=[*most, empty("x")])) == "too-many"
    i8 = [[f"t{i}", "int8", [0], b"", 0.0] for i in range(bounds.MAX_TENSORS + 1)]
    assert reason_of(body_of("update", encoding="int8", tensors=i8)) == "too-many"
    assert len(dec("update", encoding="int8", tensors=i8[1:]).tensors) == len(i8) - 1


@pytest.mark.parametrize("encoding", ["float32", "int8"])
def test_tensor_names_are_bounded_and_printable(encoding: str) -> None:
    def entry(name: str) -> list[Any]:
        return empty(name) if encoding == "float32" else [name, "int8", [0], b"", 0.0]

    name = "layer/" + "n" * (bounds.MAX_TENSOR_NAME - 6)
    assert list(dec("update", encoding=encoding, tensors=[entry(name)]).tensors) == [name]
    for bad in (name + "n", "dense\nkernel", "\x1b[31m"):
        assert reason_of(body_of("update", encoding=encoding, tensors=[entry(bad)])) == "bad-text"


@pytest.mark.parametrize("encoding", ["float32", "int8"])
def test_a_zero_dimension_cannot_hide_absurd_other_dimensions(encoding: str) -> None:
    def entry(shape: list[int]) -> list[Any]:
        return (["w", "float32", shape, b""] if encoding == "float32"
                else ["w", "int8", shape, b"", 0.0])

    most = [0, 2**20, 2**20]  # 2**40 elements if the zero counted as one
    out = dec("update", encoding=encoding, tensors=[entry(most)])
    assert out.tensors["w"].shape == (0, 2**20, 2**20)
    for bad in ([0, 2**20, 2**20, 2], [0, bounds.MAX_DIM, bounds.MAX_DIM], [0, 2**31],
                [1] * (bounds.MAX_NDIM + 1)):
        assert reason_of(body_of("update", encoding=encoding, tensors=[entry(bad)])) == "bad-shape"
    deepest = ["w", "float32", [1] * bounds.MAX_NDIM, b"\0" * 4]
    assert dec("model", tensors=[deepest]).tensors["w"].ndim == bounds.MAX_NDIM


def test_report_documents_are_bounded() -> None:
    # a map, a list and its items: MAX_DOCUMENT_ITEMS values in all
    most = {"l": [None] * (bounds.MAX_DOCUMENT_ITEMS - 2)}
    assert len(dec("report", data=most).data["l"]) == len(most["l"])
    assert reason_of(body_of("report", data={"l": [*most["l"], None]})) == "too-many"
    text = "x" * bounds.MAX_DOCUMENT_TEXT
    edge = {text: text, "n": [bounds.MAX_INT, -bounds.MAX_INT, 1.5, True, None]}
    assert dec("report", data=edge).data == edge
    for bad, reason in [({"s": text + "x"}, "bad-text"), ({text + "x": 1}, "bad-text"),
                        ({"s": "a\nb"}, "bad-text"), ({"n": bounds.MAX_INT + 1}, "out-of-bounds"),
                        ({"n": [-bounds.MAX_INT - 1]}, "out-of-bounds"),
                        ({"x": float("nan")}, "non-finite"), ({"b": b"raw"}, "wrong-type")]:
        assert reason_of(body_of("report", data=bad)) == reason, bad
    deep: Any = 1
    for _ in range(bounds.MAX_DOCUMENT_DEPTH + 1):
        deep = [deep]
    assert reason_of(body_of("report", data={"d": deep})) == "bad-value"


# -- what the project itself sends stays within the bounds -----------------------------------

def test_what_the_aggregator_and_the_workers_send_decodes() -> None:
    from aggregator import AggregatorConfig
    from aggregator.control import SEQ_RANGE
    from worker.service import SOFTWARE

    assert SEQ_RANGE == bounds.SEQ_RANGE
    assert bounds.MAX_INCARNATION * SEQ_RANGE + SEQ_RANGE <= bounds.MAX_INT
    refusal = Welcome("p1", False, "model mismatch: the party's model has other tensor names, "
                      "dtypes or shapes than the federation's (check --model)", -1, -1, -1, {}, {})
    last = Welcome("p1", True, "", 7, bounds.MAX_SEQ, bounds.MAX_INCARNATION * SEQ_RANGE,
                   AggregatorConfig().settings(), tensors())
    for msg in (refusal, last, Join("0", 600, tensors(), software=SOFTWARE),
                Heartbeat("0", -1), Stop(-1, "time limit 60 s"), Leave("0", "stopped"),
                Update("0", bounds.MAX_SEQ, 0, bounds.MAX_SAMPLES, tensors(),
                       {"loss": 0.1, "accuracy": 0.9, "train_seconds": 1.5, "epsilon": 2.0})):
        assert_same(decode(encode(msg)), msg)


# -- the field types come from the annotations, resolved ----------------------------------------

Weights = Tensors  # another name for the same type


@dataclass
class Renamed:
    KIND: ClassVar[str] = "model"
    version: int
    tensors: Weights


@dataclass
class Unbounded:
    KIND: ClassVar[str] = "model"
    count: int


def test_field_types_are_resolved_not_compared_as_annotation_strings() -> None:
    from messages.wire.codec import _spec_of

    spec = {f.name: f for f in _spec_of(Renamed)}  # type: ignore[arg-type]
    assert spec["tensors"].tensors and not spec["version"].tensors
    with pytest.raises(TypeError, match="no bound"):
        _spec_of(Unbounded)  # type: ignore[arg-type]
    body = encode(Renamed(3, {"w": np.ones(2, np.float32)}))  # type: ignore[arg-type]
    out = decode(body)
    assert isinstance(out, Model) and out.version == 3 and (out.tensors["w"] == 1).all()


# -- property: whatever decode accepts can be re-encoded, checkpointed and logged ------------

def near(*edges: int) -> st.SearchStrategy[int]:
    """Integers around ``edges`` (as far as msgpack can carry them), or anywhere."""
    return st.sampled_from(sorted({e + d for e in edges for d in (-1, 0, 1)
                                   if -(2**63) <= e + d < 2**64})) | st.integers(-(2**63),
                                                                                 2**64 - 1)


INT_VALUES = near(0, bounds.MAX_SAMPLES, bounds.MAX_SEQ, bounds.MAX_NEXT_SEQ, bounds.MAX_INT,
                  2**53, 2**63 - 1, 2**64 - 1, -(2**63))
TEXT_VALUES = (st.sampled_from(["", "p", "a" * 64, "a" * 65, "p\n", "pé", "x" * 513])
               | st.text(max_size=80))
FLOAT_VALUES = st.floats() | st.integers(-(2**63), 2**64 - 1) | st.booleans()
METRIC_VALUES = st.dictionaries(TEXT_VALUES, FLOAT_VALUES, max_size=70) | st.lists(
    FLOAT_VALUES, max_size=2)
SETTING_VALUES = st.dictionaries(TEXT_VALUES, INT_VALUES | FLOAT_VALUES | TEXT_VALUES,
                                 max_size=66)


def field_values(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    hints = get_type_hints(KINDS[kind])
    by_type: dict[Any, st.SearchStrategy[Any]] = {
        int: INT_VALUES | st.booleans(), str: TEXT_VALUES, float: FLOAT_VALUES,
        bool: st.booleans() | st.integers(0, 1), dict[str, float]: METRIC_VALUES,
        Settings: SETTING_VALUES}
    return st.fixed_dictionaries({}, optional={
        name: by_type[hints[name]] for name in KINDS[kind].__dataclass_fields__
        if hints[name] in by_type})


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(BASE)).flatmap(lambda k: st.tuples(st.just(k), field_values(k))))
def test_whatever_decode_accepts_re_encodes_packs_and_dumps(case: tuple[str, dict[str, Any]]
                                                           ) -> None:
    kind, fields = case
    try:
        msg = dec(kind, **fields)
    except InvalidMessage:
        return
    assert_same(decode(encode(msg)), msg)
    plain = {name: getattr(msg, name) for name in msg.__dataclass_fields__ if name != "tensors"}
    shown = {k: x for k, x in plain.items()  # key material is neither logged nor reported
             if not isinstance(x, bytes) and not (x and isinstance(x, list)
                                                  and isinstance(x[0], bytes))}
    assert json.loads(json.dumps(shown, allow_nan=False)) == shown  # status JSON, log lines
    assert msgpack.unpackb(msgpack.packb(plain)) == plain
    for x in plain.values():  # exact for JSON readers that parse numbers as doubles
        if type(x) is int:
            assert float(x) == x and abs(x) <= bounds.MAX_INT
    if isinstance(msg, Update):  # what the aggregator derives and checkpoints from an update
        incarnation = msg.seq // bounds.SEQ_RANGE + 1
        checkpoint = {"last_seq": {msg.party: msg.seq}, "incarnation": {msg.party: incarnation},
                      "next_seq": incarnation * bounds.SEQ_RANGE, "version": msg.base_version + 1,
                      "samples": msg.num_samples * 1000, "metrics": {msg.party: msg.metrics}}
        assert msgpack.unpackb(msgpack.packb(checkpoint), strict_map_key=False) == checkpoint
        assert checkpoint["next_seq"] + bounds.SEQ_RANGE <= bounds.MAX_INT + 1
        assert json.dumps(checkpoint, allow_nan=False)
        assert bounds.PARTY_ID.match(msg.party) and "\n" not in repr(msg)
