"""Delta compression: round-trip error bounds, error feedback, bytes on the wire, refusals."""

from __future__ import annotations

import contextlib
import math
import uuid
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from messages.errors import ConfigError, InvalidMessage
from messages.wire.codec import SCHEMA_VERSION, decode, encode
from messages.wire.compression import ENCODINGS, MAX_SCALE, Packed, pack, topk_count, unpack
from messages.wire.kinds import Update
from worker.compression import DeltaCompressor
from worker.config import WorkerConfig

RNG = np.random.default_rng(0)
LOSSY = ["float16", "int8", "topk"]
CNN_SHAPES = {  # worker.models:mnist_cnn, without building it (no TensorFlow here)
    "conv1/kernel": (3, 3, 1, 32), "conv1/bias": (32,), "conv2/kernel": (3, 3, 32, 64),
    "conv2/bias": (64,), "dense1/kernel": (9216, 128), "dense1/bias": (128,),
    "output/kernel": (128, 10), "output/bias": (10,),
}


def delta(shape: tuple[int, ...], scale: float = 0.01) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def round_trip(tensors: dict[str, np.ndarray], encoding: str, **kw: Any) -> dict[str, np.ndarray]:
    """What the aggregator decodes from an update of ``tensors`` in ``encoding``."""
    packed = {n: pack(a, encoding, **kw) for n, a in tensors.items()}
    msg = decode(encode(Update("p", 0, 0, 10, tensors, encoding=encoding), packed=packed))
    assert isinstance(msg, Update) and msg.encoding == encoding
    for name, a in msg.tensors.items():
        assert a.dtype == np.float32 and a.shape == tensors[name].shape
    return msg.tensors


# -- round trips ---------------------------------------------------------------------------
def test_float16_round_trip_is_within_half_a_float16_ulp() -> None:
    x = delta((200, 50), scale=1.0) * np.float32(10) ** RNG.integers(-3, 3, (200, 50))
    got = round_trip({"w": x}, "float16")["w"]
    bound = np.maximum(np.abs(x) * 2.0**-11, 2.0**-25)  # relative, or subnormal spacing
    assert (np.abs(got - x) <= bound).all()


def test_float16_clips_values_beyond_its_range_instead_of_sending_inf() -> None:
    got = round_trip({"w": np.array([1e6, -1e6, 1.0], np.float32)}, "float16")["w"]
    np.testing.assert_array_equal(got, [65504.0, -65504.0, 1.0])


def test_int8_error_is_at_most_half_a_step_of_the_per_tensor_scale() -> None:
    x = delta((300, 40))
    scale = np.float32(np.abs(x).max()) / np.float32(127)
    p = pack(x, "int8")
    assert p.scale == scale and p.data.dtype == np.int8 and np.abs(p.data).max() == 127
    got = round_trip({"w": x}, "int8")["w"]
    assert np.abs(got - x).max() <= scale / 2 * (1 + 1e-5)


def test_topk_keeps_exactly_the_k_largest_magnitudes_and_zeros_elsewhere() -> None:
    n = 5000
    x = (RNG.permutation(n).astype(np.float32) + 1) * RNG.choice([-1, 1], n).astype(np.float32)
    x = x.reshape(50, 100) / np.float32(n)
    got = round_trip({"w": x}, "topk", topk_fraction=0.01)["w"]
    k = topk_count(n, 0.01)
    assert k == 50
    kept = np.flatnonzero(got)
    np.testing.assert_array_equal(np.sort(kept), np.sort(np.argsort(-np.abs(x).ravel())[:k]))
    np.testing.assert_array_equal(got.ravel()[kept], x.ravel()[kept])  # values exact


def test_topk_keeps_at_least_one_entry_and_at_most_all() -> None:
    assert [topk_count(n, 0.01) for n in (0, 1, 10, 149, 151, 1000)] == [0, 1, 1, 1, 2, 10]
    assert topk_count(7, 1.0) == 7
    x = np.array([0.5, -2.0, 1.0], np.float32)
    np.testing.assert_array_equal(round_trip({"w": x}, "topk", topk_fraction=1.0)["w"], x)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_zero_scalar_empty_and_constant_tensors_survive_every_encoding(encoding: str) -> None:
    tensors = {"zeros": np.zeros((4, 5), np.float32), "scalar": np.array(-0.25, np.float32),
               "empty": np.zeros((0, 5), np.float32), "same": np.full(64, 0.125, np.float32)}
    got = round_trip(tensors, encoding)
    np.testing.assert_array_equal(got["zeros"], 0)
    np.testing.assert_array_equal(got["scalar"], -0.25)  # exact in float16 and int8 too
    assert got["empty"].shape == (0, 5)
    if encoding == "topk":  # 1% of 64 rounds to 1: one of the equal values is kept
        assert np.count_nonzero(got["same"]) == 1 and got["same"].max() == np.float32(0.125)
    else:
        np.testing.assert_array_equal(got["same"], 0.125)


def test_float32_updates_keep_the_dense_zero_copy_format() -> None:
    x = delta((10, 10))
    body = encode(Update("p", 0, 0, 10, {"w": x}, sent_at=1.0))
    assert body == encode(Update("p", 0, 0, 10, {"w": x}, sent_at=1.0),
                          packed={"w": pack(x, "float32")})
    assert msgpack.unpackb(body)["tensors"] == [["w", "float32", [10, 10], x.tobytes()]]
    got = decode(body)
    assert isinstance(got, Update) and not got.tensors["w"].flags.owndata


def test_packed_tensors_must_match_the_updates_encoding() -> None:
    x = delta((3,))
    with pytest.raises(ValueError, match="packed as int8"):
        encode(Update("p", 0, 0, 10, {"w": x}, encoding="topk"), packed={"w": pack(x, "int8")})


# -- error feedback ------------------------------------------------------------------------
@pytest.mark.parametrize(("encoding", "fraction"), [("topk", 0.01), ("topk", 0.1),
                                                    ("int8", 0.01), ("float16", 0.01)])
def test_error_feedback_makes_what_was_sent_track_the_true_deltas(encoding: str,
                                                                  fraction: float) -> None:
    shapes = {"k": (40, 50), "b": (50,), "s": ()}
    c = DeltaCompressor(encoding, fraction)
    true = {n: np.zeros(s, np.float64) for n, s in shapes.items()}
    sent = {n: np.zeros(s, np.float64) for n, s in shapes.items()}
    norms = []
    for _ in range(300):
        d = {n: delta(s) + np.float32(0.002) for n, s in shapes.items()}  # a steady drift too
        packed, decoded = c.compress(d)
        for n in shapes:
            true[n] += d[n]
            sent[n] += decoded[n]
            np.testing.assert_array_equal(decoded[n], packed[n].dense())
        norms.append(c.residual_norm())
    for n in shapes:  # what was sent = the true sum - what is still held back
        np.testing.assert_allclose(sent[n], true[n] - c.residual[n], atol=1e-3)
    one_delta = float(np.sqrt(sum(np.sum(delta(s) ** 2) for s in shapes.values())))
    # bounded: the residual stops growing (Stich et al.: at most ~2/fraction deltas)
    assert max(norms[-50:]) <= 1.2 * max(norms[100:150]) + 1e-6
    assert max(norms) <= 2 / fraction * one_delta


def test_without_error_feedback_topk_loses_the_small_coordinates_for_good() -> None:
    small = np.full((20, 50), 0.001, np.float32)
    small[0, 0] = 1.0  # one large coordinate takes the single slot every time
    with_ef, without = DeltaCompressor("topk", 0.001), DeltaCompressor("topk", 0.001,
                                                                       error_feedback=False)
    got_ef = sum(with_ef.compress({"w": small})[1]["w"] for _ in range(2000))
    got_plain = sum(without.compress({"w": small})[1]["w"] for _ in range(2000))
    assert np.count_nonzero(got_plain) == 1 and without.residual == {}
    assert np.count_nonzero(got_ef) > 100  # accumulated small ones overtake and get sent


def test_a_non_finite_delta_does_not_poison_the_residual() -> None:
    c = DeltaCompressor("int8")
    c.compress({"w": np.array([1.0, 0.3], np.float32)})
    assert "w" in c.residual
    c.compress({"w": np.array([np.nan, 0.3], np.float32)})
    assert "w" not in c.residual
    _packed, sent = c.compress({"w": np.array([1.0, 0.5], np.float32)})
    assert np.isfinite(sent["w"]).all()


def test_float32_encoding_needs_no_residual() -> None:
    c = DeltaCompressor("float32")
    x = delta((5,))
    _packed, sent = c.compress({"w": x})
    np.testing.assert_array_equal(sent["w"], x)
    assert c.residual == {}


# -- bytes on the wire ---------------------------------------------------------------------
def test_bytes_on_the_wire_of_the_mnist_cnn_update_per_encoding() -> None:
    tensors = {n: delta(s) for n, s in CNN_SHAPES.items()}

    def size(encoding: str, fraction: float = 0.01) -> int:
        packed = {n: pack(a, encoding, fraction) for n, a in tensors.items()}
        return len(encode(Update("0", 5, 3, 30000, tensors, {"loss": 0.1}, encoding),
                          packed=packed))

    dense = size("float32")
    assert dense > 4 * 1_199_882
    assert 1.98 < dense / size("float16") <= 2.0
    assert 3.9 < dense / size("int8") <= 4.0
    assert 4.8 < dense / size("topk", 0.1) <= 5.0
    assert 45 < dense / size("topk", 0.01) <= 50


# -- refusals ------------------------------------------------------------------------------
def body(encoding: Any, *tensors: Any, field: Any = None) -> bytes:
    msg = {"v": SCHEMA_VERSION, "kind": "update", "party": "p", "seq": 0, "base_version": 0,
           "num_samples": 10, "encoding": encoding,
           "tensors": list(tensors) if field is None else field}
    return msgpack.packb(msg)  # type: ignore[no-any-return]


def f32(*values: float) -> bytes:
    return np.array(values, "<f4").tobytes()


def u32(*values: int) -> bytes:
    return np.array(values, "<u4").tobytes()


def i8(*values: int) -> bytes:
    return np.array(values, "i1").tobytes()


def f16(*values: float) -> bytes:
    return np.array(values, "<f2").tobytes()


ABSURD = [0] + [2**31 - 1] * 4
REFUSED = [
    (body("zstd", ["w", "float32", [2], f32(1, 2)]), "bad-encoding"),
    (body(5, ["w", "float32", [2], f32(1, 2)]), "wrong-type"),
    (body("topk", ["w", "float32", [4], f32(1), u32(4)]), "bad-index"),
    (body("topk", ["w", "float32", [4], f32(1, 2), u32(2, 2)]), "bad-index"),
    (body("topk", ["w", "float32", [4], f32(1, 2), u32(3, 1)]), "bad-index"),
    (body("topk", ["w", "float32", [4], f32(1, 2), u32(9, 1)]), "bad-index"),
    (body("topk", ["w", "float32", [4], f32(1, 2), u32(1)]), "bad-shape"),
    (body("topk", ["w", "float32", [4], f32(1) + b"\0", u32(1) + b"\0"]), "bad-shape"),
    (body("topk", ["w", "float32", [2], f32(1, 2, 3), u32(0, 1, 2)]), "bad-shape"),
    (body("topk", ["w", "float32", [4], f32(1), "0"]), "bad-tensor"),
    (body("topk", ["w", "float32", [4], f32(1)]), "bad-tensor"),
    (body("topk", ["w", "float16", [4], f16(1), u32(1)]), "bad-dtype"),
    (body("topk", ["w", "float32", [4], f32(math.nan), u32(1)]), "non-finite"),
    (body("topk", ["w", "float32", [2**30, 2**30], f32(1), u32(0)]), "too-large"),
    (body("topk", *[[f"w{i}", "float32", [2**24], f32(1), u32(0)] for i in range(9)]),
     "too-large"),  # each fits, together they would decode to 9 x 64 MiB
    (body("topk", ["w", "float32", ABSURD, b"", b""]), "bad-shape"),
    (body("topk", ["w", "float32", [-1], b"", b""]), "bad-shape"),
    (body("topk", ["w", "float32", [2], f32(1), u32(0)],
          ["w", "float32", [2], f32(1), u32(0)]), "bad-tensor"),
    (body("topk", [7, "float32", [2], f32(1), u32(0)]), "bad-tensor"),
    (body("topk", field={"w": 1}), "wrong-type"),
    (body("topk", {"w": 1}), "bad-tensor"),
    (body("int8", ["w", "int8", [2], i8(1, 2), -0.5]), "bad-scale"),
    (body("int8", ["w", "int8", [2], i8(1, 2), math.nan]), "bad-scale"),
    (body("int8", ["w", "int8", [2], i8(1, 2), math.inf]), "bad-scale"),
    (body("int8", ["w", "int8", [2], i8(1, 2), MAX_SCALE * 2]), "bad-scale"),
    (body("int8", ["w", "int8", [2], i8(1, 2), "0.1"]), "bad-scale"),
    (body("int8", ["w", "int8", [2], i8(1, 2), True]), "bad-scale"),
    (body("int8", ["w", "int8", [2], i8(1, -128), 0.1]), "bad-value"),
    (body("int8", ["w", "int8", [3], i8(1, 2), 0.1]), "bad-shape"),
    (body("int8", ["w", "int8", [2], i8(1, 2)]), "bad-tensor"),
    (body("int8", ["w", "uint8", [2], i8(1, 2), 0.1]), "bad-dtype"),
    (body("int8", ["w", "int8", [2], 12, 0.1]), "bad-tensor"),
    (body("float16", ["w", "float16", [2], f16(1, math.nan)]), "non-finite"),
    (body("float16", ["w", "float16", [2], f16(1, math.inf)]), "non-finite"),
    (body("float16", ["w", "float16", [2], f16(1)]), "bad-shape"),
    (body("float16", ["w", "float32", [2], f32(1, 2)]), "bad-dtype"),
    (body("float16", ["w", "float16", [2], f16(1, 2), 0.5]), "bad-tensor"),
    (body("float16", ["w", "float16", ABSURD, b""]), "bad-shape"),
]


@pytest.mark.parametrize(("bad", "reason"), REFUSED, ids=[r for _b, r in REFUSED])
def test_malformed_compressed_updates_raise_invalid_message_with_a_reason(bad: bytes,
                                                                          reason: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        decode(bad)
    assert info.value.reason == reason


def test_a_tiny_topk_body_claiming_a_huge_tensor_is_refused_before_allocating() -> None:
    bad = body("topk", ["w", "float32", [2**16, 2**15], f32(1), u32(0)])  # 8 GiB dense
    assert len(bad) < 120
    with pytest.raises(InvalidMessage, match="too-large"):
        decode(bad, max_bytes=1 << 20)
    ok = decode(body("topk", ["w", "float32", [2**18], f32(1), u32(7)]), max_bytes=1 << 20)
    assert isinstance(ok, Update) and ok.tensors["w"][7] == 1


# -- properties ----------------------------------------------------------------------------
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
arrays = hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9),
                    elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=False))


@PROPERTY
@given(arrays, st.sampled_from(LOSSY), st.floats(0.01, 1.0))
def test_every_round_trip_stays_within_its_encodings_bound(x: np.ndarray, encoding: str,
                                                           fraction: float) -> None:
    got = round_trip({"w": x}, encoding, topk_fraction=fraction)["w"]
    err = np.abs(got.astype(np.float64) - x)
    if encoding == "float16":
        assert (err <= np.maximum(np.abs(x) * 2.0**-11, 2.0**-25)).all()
    elif encoding == "int8":
        assert (err <= float(pack(x, "int8").scale) / 2 * (1 + 1e-5) + 1e-30).all()
    else:
        kept = np.flatnonzero(got)
        assert len(kept) <= topk_count(x.size, fraction)
        np.testing.assert_array_equal(got.ravel()[kept], x.ravel()[kept])
        dropped = np.ones(x.size, bool)
        dropped[kept] = False
        if len(kept) and dropped.any():  # no dropped entry is larger than a kept one
            assert np.abs(x.ravel()[dropped]).max() <= np.abs(x.ravel()[kept]).min()


entry_parts = st.one_of(st.text(max_size=4), st.sampled_from(["float32", "float16", "int8"]),
                        st.lists(st.integers(-2, 2**31), max_size=3), st.binary(max_size=24),
                        st.floats(), st.integers(-(2**40), 2**40), st.booleans())


@PROPERTY
@given(st.sampled_from(LOSSY), st.lists(st.lists(entry_parts, max_size=6), max_size=3))
def test_arbitrary_compressed_entries_only_raise_invalid_message(encoding: str,
                                                                  entries: list[Any]) -> None:
    with contextlib.suppress(InvalidMessage):
        decode(body(encoding, *entries))
    for entry in entries:
        with contextlib.suppress(InvalidMessage):
            unpack(encoding, entry, 1 << 20)


# -- options -------------------------------------------------------------------------------
def test_bad_encoding_options_are_refused_at_construction() -> None:
    with pytest.raises(ConfigError, match="--encoding"):
        WorkerConfig(encoding="zstd")
    with pytest.raises(ConfigError, match="--topk-fraction"):
        WorkerConfig(encoding="topk", topk_fraction=0)
    with pytest.raises(ConfigError, match="--topk-fraction"):
        DeltaCompressor("topk", 1.5)
    with pytest.raises(ValueError, match="unknown encoding"):
        pack(np.zeros(2, np.float32), "zstd")


def test_the_encoding_options_reach_the_worker_config_from_both_commands(
        capsys: pytest.CaptureFixture[str]) -> None:
    from deploy import cli as deploy_cli
    from messages.daemon.cli import flags_for
    from worker.cli import build_parser

    ns = build_parser().parse_args(["--encoding", "topk", "--topk-fraction", "0.05"])
    config = WorkerConfig.load(flags_for(ns, WorkerConfig))
    assert (config.encoding, config.topk_fraction) == ("topk", 0.05)
    with pytest.raises(SystemExit):
        deploy_cli.main(["run", "--help"])
    shown = capsys.readouterr().out
    assert "--encoding {float32,float16,int8,topk}" in shown and "--topk-fraction F" in shown


# -- a federation --------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(("encoding", "fraction"), [("float16", 0.01), ("int8", 0.01),
                                                    ("topk", 0.1)])
def test_a_federation_learns_with_compressed_deltas(encoding: str, fraction: float) -> None:
    from aggregator import Aggregator, AggregatorConfig
    from worker import Worker

    tiny = {"model": "worker.models:tiny_cnn", "data": "worker.data:load_synthetic"}
    broker = f"memory://{uuid.uuid4().hex[:8]}"
    agg = Aggregator(AggregatorConfig(broker=broker, min_parties=2, max_versions=8,
                                      local_steps=5, eval_every_seconds=0.5, **tiny)).start()
    parties = [Worker(WorkerConfig(party_id=i, num_parties=2, broker=broker, encoding=encoding,
                                   topk_fraction=fraction, **tiny)).start() for i in range(2)]
    assert agg.wait(240)
    for p in parties:
        assert p.wait(60)
    history = agg.history
    assert history[-1]["version"] == 8 and history[-1]["accuracy"] > history[0]["accuracy"]
    assert agg.status.rejected == {}
    dense = sum(4 * w.size for w in agg.weights)
    sent = sum(p.stats.updates_sent for p in parties)
    per_update = sum(p.stats.update_bytes for p in parties) / sent
    assert per_update < dense / {"float16": 1.9, "int8": 3.5, "topk": 4.0}[encoding]


def test_packed_reports_its_wire_bytes() -> None:
    p = pack(delta((100,)), "topk", 0.05)
    assert isinstance(p, Packed) and p.nbytes == 5 * 8
