"""Checkpoints: atomic writes, damaged-file fallback, exact resume."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import uuid
from pathlib import Path

import msgpack
import numpy as np
import pytest

from aggregator import Aggregator, AggregatorConfig
from aggregator.checkpoint import (
    AggregatorState,
    CheckpointError,
    CheckpointStore,
    dump_parts,
    dumps,
    loads,
)
from aggregator.strategies import Contribution, Outcome
from tests.test_aggregator_service import Client, Topology


def state(version: int) -> AggregatorState:
    rng = np.random.default_rng(version)
    return AggregatorState(
        version=version, released=True, names=["k", "b"],
        weights=[rng.standard_normal((3, 2)).astype(np.float32), np.zeros(2, np.float32)],
        last_seq={"0": 2**32 + version}, incarnation={"0": 1},
        strategy={"strategy": "fedbuff", "accumulator": [np.ones(2)], "weight_sum": 1.5,
                  "count": 1, "parties": ["0"]},
        parties=[{"party": "0", "num_samples": 10, "joined_at": 0.0, "last_seen": 1.0,
                  "active": True, "updates": 3, "staleness_sum": 2, "metrics": {"loss": 0.5}}],
        counters={"updates": 3, "rejected": {"stale": 1}}, ledger=[["0", 5]])


def assert_same(a: AggregatorState, b: AggregatorState) -> None:
    assert a.version == b.version and a.names == b.names and a.last_seq == b.last_seq
    for x, y in zip(a.weights, b.weights, strict=True):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
    np.testing.assert_array_equal(a.strategy["accumulator"][0], b.strategy["accumulator"][0])
    assert a.parties == b.parties and a.counters == b.counters and a.ledger == b.ledger


def test_a_checkpoint_round_trips_bit_for_bit() -> None:
    original = state(7)
    restored = loads(dumps(original))
    assert_same(restored, original)
    assert restored.weights[0].flags.writeable  # strategies update weights in place


def test_a_checkpoint_of_the_first_format_still_loads() -> None:
    """Version 1 files: SHA-256 and the arrays inside the msgpack payload."""
    original = state(3)

    def default(obj: object) -> object:
        if isinstance(obj, np.ndarray):
            return msgpack.ExtType(1, msgpack.packb([obj.dtype.str, list(obj.shape),
                                                     obj.tobytes()]))
        raise TypeError(obj)

    payload = msgpack.packb({f.name: getattr(original, f.name)
                             for f in dataclasses.fields(original)}, default=default)
    v1 = b"DFLCKPT1" + hashlib.sha256(payload).digest() + payload
    assert_same(loads(v1), original)
    with pytest.raises(CheckpointError):
        loads(v1[:-1])


def test_writing_a_checkpoint_copies_no_weight_array() -> None:
    original = state(4)
    parts = dump_parts(original)
    for w in original.weights:
        assert any(isinstance(p, memoryview) and np.shares_memory(np.asarray(p), w)
                   for p in parts)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_a_damaged_checkpoint_is_detected(damage: str) -> None:
    data = bytearray(dumps(state(1)))
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-10] ^= 0xFF
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(CheckpointError):
        loads(bytes(data))


def test_the_newest_valid_checkpoint_is_used_and_a_corrupt_one_skipped(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = CheckpointStore(tmp_path)
    store.save(state(1))
    newest = store.save(state(2))
    newest.write_bytes(newest.read_bytes()[:100])  # a crash tore the newest file
    loaded = store.load_latest()
    assert loaded is not None and loaded.version == 1
    assert "damaged" in caplog.text and newest.name in caplog.text


def test_a_crash_in_the_middle_of_a_write_leaves_the_old_checkpoint_usable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(tmp_path)
    store.save(state(1))

    def crash(*_args: object) -> None:
        raise OSError("power cut during rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.save(state(2))
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    loaded = store.load_latest()
    assert loaded is not None and loaded.version == 1


def test_only_the_newest_few_checkpoints_are_kept(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    for v in range(6):
        store.save(state(v))
    assert len(store.files()) == 3
    loaded = store.load_latest()
    assert loaded is not None and loaded.version == 5


def test_a_restarted_aggregator_resumes_with_identical_weights_and_state(tmp_path: Path) -> None:
    url = f"memory://{uuid.uuid4().hex[:8]}"
    config = AggregatorConfig(broker=url, federation="f", evaluate=False, min_parties=1,
                              strategy="fedbuff", buffer_k=3, checkpoint_dir=str(tmp_path),
                              checkpoint_every_updates=1)
    first = Aggregator(config).start()
    client = Client(url, Topology("f"))
    seq = client.join("a").next_seq
    for i in range(4):  # one applied version (k=3) plus one update in the buffer
        client.update("a", seq + i, 0 if i < 3 else 1, value=float(i + 1))
    client.pump(lambda: first.status.updates == 4 and first.status.checkpoints >= 5)
    first.stop()
    first.wait(10)
    second = Aggregator(config).start()
    client.pump(lambda: second.status.version == 1)
    for x, y in zip(first.weights, second.weights, strict=True):
        assert x.tobytes() == y.tobytes()
    assert second.applied.state() == first.applied.state()
    assert second.strategy.state()["count"] == 1
    np.testing.assert_array_equal(second.strategy.state()["accumulator"][0],
                                  first.strategy.state()["accumulator"][0])
    assert second.membership.parties["a"].updates == 4
    # the rest of the buffer completes as it would have without the restart
    client.update("a", seq + 4, 1)
    client.update("a", seq + 5, 1)
    client.pump(lambda: second.status.version == 2)
    second.stop()
    second.wait(10)
    client.b.close()


def test_a_checkpoint_written_before_the_refactor_resumes_exactly(tmp_path: Path) -> None:
    """tests/data/checkpoint-000000000001.dfl was written by the code before the layered
    messages/, the strategies package and the delivery boundary (commit d0a9b47): a FedBuff
    buffer holding two of three updates, two parties, counters and a ledger. It must load,
    and the aggregator must continue from it exactly as the old one would have."""
    shutil.copy(Path(__file__).parent / "data" / "checkpoint-000000000001.dfl", tmp_path)
    agg = Aggregator(AggregatorConfig(broker="memory://", evaluate=False, strategy="fedbuff",
                                      buffer_k=3, staleness="constant",
                                      checkpoint_dir=str(tmp_path)))
    state = agg.store.load_latest() if agg.store else None
    assert state is not None and state.version == 5 and state.released
    agg._restore(state)
    assert agg.status.version == 5 and agg.status.updates == 7
    assert agg.applied.lasts() == {"a": 4294967300, "b": 4294967297}
    assert agg.ledger == [["a", 4294967296], ["b", 4294967297]]
    assert agg.strategy.parties == ("a", "b")  # the buffer came back
    weights = [w.copy() for w in agg.weights]
    third = Contribution("a", [np.zeros((4, 3), np.float32), np.zeros(3, np.float32)], 100, 0)
    assert agg.strategy.offer(weights, third) is Outcome.APPLIED
    # w += eta * (100*0.5 + 300*-0.5 + 100*0) / 500 for the kernel, (25 + 225 + 0) / 500 bias
    np.testing.assert_allclose(weights[0], agg.weights[0] - 0.2, rtol=1e-6)
    np.testing.assert_allclose(weights[1], agg.weights[1] + 0.5, rtol=1e-6)
