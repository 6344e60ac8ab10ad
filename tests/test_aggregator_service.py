"""The aggregator service over a real broker connection (memory://), without TensorFlow.

A test plays the parties with a plain broker client speaking the wire protocol, so every
path (join, update, duplicate, bad input, leave) runs through the same code as in production.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from aggregator import Aggregator, AggregatorConfig
from messages.errors import FederationError, StateError
from messages.transport.broker import Broker, Delivery
from messages.transport.connect import connect
from messages.transport.topology import Topology
from messages.wire.codec import SCHEMA_VERSION, decode, encode
from messages.wire.deadletters import DeadLetter, read_dead
from messages.wire.kinds import (
    Heartbeat,
    Join,
    Leave,
    Message,
    Model,
    Query,
    Report,
    Stop,
    Update,
    Welcome,
)
from tests.processes import ENV, dfl

SHAPES = {"dense/kernel": (4, 3), "dense/bias": (3,)}


def initial() -> dict[str, np.ndarray]:
    return {name: np.full(shape, 1.0, np.float32) for name, shape in SHAPES.items()}


def delta(value: float) -> dict[str, np.ndarray]:
    return {name: np.full(shape, value, np.float32) for name, shape in SHAPES.items()}


class Client:
    """Plays one or more parties against the aggregator."""

    def __init__(self, url: str, topology: Topology, *, collect_dead: bool = True) -> None:
        self.b: Broker = connect(url)
        self.t = topology
        topology.declare(self.b)
        self.models: list[Model] = []
        self.broadcasts: list[Message] = []
        self.raw_dead: list[Delivery] = []  # dead letters and their reason records
        if collect_dead:
            self.b.consume(topology.dead, self._on_dead)

    def _on_dead(self, d: Delivery) -> None:
        self.raw_dead.append(d)
        self.b.ack(d)

    @property
    def dead(self) -> list[DeadLetter]:
        """The dead letters so far, each with its reason."""
        return read_dead((d.body, d.headers) for d in self.raw_dead)

    def listen(self, party: str) -> None:
        q = self.t.declare_model_queue(self.b, party)
        self.b.consume(q, self._on_broadcast, auto_ack=True)

    def _on_broadcast(self, d: Delivery) -> None:
        msg = decode(d.body)
        self.broadcasts.append(msg)
        if isinstance(msg, Model):
            self.models.append(msg)

    def join(self, party: str, tensors: dict[str, np.ndarray] | None = None) -> Welcome:
        reply = decode(self.b.call(self.t.control, encode(
            Join(party, 100, initial() if tensors is None else tensors)), timeout=5).body)
        assert isinstance(reply, Welcome)
        return reply

    def send(self, body: bytes) -> None:
        self.b.publish("", self.t.updates, body, mandatory=True)

    def update(self, party: str, seq: int, base: int, value: float = 1.0, **kw: Any) -> None:
        self.send(encode(Update(party, seq, base, kw.pop("num_samples", 100), delta(value),
                                **kw)))

    def ask(self, what: str) -> Message:
        """An operator's query, as ``dfl status``/``dfl start`` send it."""
        return decode(self.b.call(self.t.control, encode(Query(what)), timeout=5,
                                  exchange=self.t.ingress).body)

    def pump(self, done: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "timed out"
            self.b.process_events(0.02)


@dataclass
class Env:
    """Where a test's federation lives: a broker URL and a fresh federation id."""

    url: str
    federation: str

    def start(self, **options: Any) -> Aggregator:
        """An aggregator on a thread, once it consumes (a loaded machine can take seconds to
        declare quorum queues: a test's first RPC must not spend its timeout on that)."""
        options.setdefault("min_parties", 2)
        agg = Aggregator(AggregatorConfig(broker=self.url, federation=self.federation,
                                          evaluate=False, **options)).start()
        deadline = time.monotonic() + 30
        while not agg.metrics.readiness()[0] and agg.error is None:
            assert time.monotonic() < deadline, "the aggregator did not start consuming"
            time.sleep(0.01)
        return agg

    def client(self) -> Client:
        return Client(self.url, Topology(self.federation))


@pytest.fixture
def env(broker_url: str, federation: str) -> Iterator[Env]:
    """Every service test runs on memory:// and on RabbitMQ."""
    yield Env(broker_url, federation)
    with connect(broker_url) as b:
        t = Topology(federation)
        for q in (t.updates, t.control, t.dead):
            b.delete_queue(q)


@pytest.fixture
def running(env: Env) -> Iterator[tuple[Aggregator, Client]]:
    agg = env.start(mixing_alpha=0.5, staleness="constant", max_staleness=3,
                    max_message_bytes=64 * 1024)
    client = env.client()
    client.listen("a")
    client.join("a")
    client.join("b")
    client.pump(lambda: len(client.models) == 1)
    yield agg, client
    agg.stop()
    agg.wait(10)
    client.b.close()


def snapshot(agg: Aggregator) -> list[bytes]:
    return [w.tobytes() for w in agg.weights]


def test_the_first_model_is_released_once_min_parties_have_joined(env: Env) -> None:
    agg = env.start()
    client = env.client()
    client.listen("a")
    first = client.join("a")
    assert first.accepted and first.tensors == {} and first.settings["local_steps"] == 100
    client.b.process_events(0.2)
    assert client.models == []
    second = client.join("b")
    assert second.version == 0 and list(second.tensors) == list(SHAPES)
    client.pump(lambda: len(client.models) == 1)
    assert client.models[0].version == 0
    assert agg.config.start == "min-parties"  # the default
    agg.stop()
    agg.wait(10)


def test_manual_start_admits_joins_and_releases_version_0_only_on_start_training(
        env: Env) -> None:
    agg = env.start(start="manual", min_parties=1)
    with pytest.raises(FederationError, match="no party has joined yet"):
        agg.start_training()
    client = env.client()
    client.listen("a")
    for party in "ab":
        welcome = client.join(party)
        assert welcome.accepted and welcome.tensors == {} and welcome.version == -1
    client.b.process_events(0.3)
    assert client.models == [] and not agg.status.released  # min_parties=1 does not start it
    assert agg.start_training() == {"started": True, "version": 0, "parties": 2}
    client.pump(lambda: len(client.models) == 1)
    assert client.models[0].version == 0 and list(client.models[0].tensors) == list(SHAPES)
    assert list(client.join("c").tensors) == list(SHAPES)  # a late party gets the model
    with pytest.raises(FederationError, match="already started"):
        agg.start_training()
    agg.stop()
    agg.wait(10)
    with pytest.raises(FederationError, match="not running"):
        agg.start_training()


def test_a_start_query_over_the_broker_releases_version_0(env: Env) -> None:
    agg = env.start(start="manual")
    client = env.client()
    client.listen("a")
    refused = client.ask("start")
    assert isinstance(refused, Report) and "no party has joined" in refused.data["error"]
    client.join("a")
    started = client.ask("start")
    assert isinstance(started, Report)
    assert started.data == {"started": True, "version": 0, "parties": 1}
    client.pump(lambda: len(client.models) == 1)
    assert client.models[0].version == 0
    again = client.ask("start")
    assert isinstance(again, Report) and "already started" in again.data["error"]
    agg.stop()
    agg.wait(10)


def test_a_restarted_manual_aggregator_that_was_started_does_not_wait_again(
        env: Env, tmp_path: Path) -> None:
    agg = env.start(start="manual", checkpoint_dir=str(tmp_path))
    client = env.client()
    client.join("a")
    agg.start_training()
    agg.stop()
    agg.wait(10)
    again = env.start(start="manual", checkpoint_dir=str(tmp_path))
    welcome = client.join("b")  # at once from the model: no second start request
    assert welcome.version == 0 and list(welcome.tensors) == list(SHAPES)
    assert again.status.released
    again.stop()
    again.wait(10)


@pytest.mark.rabbitmq
def test_dfl_start_starts_a_manual_federation_from_another_process(
        amqp_url: str, federation: str) -> None:
    env = Env(amqp_url, federation)
    agg = env.start(start="manual")
    client = env.client()

    def dfl_start() -> subprocess.CompletedProcess[str]:
        return subprocess.run([dfl(), "start", "--broker", amqp_url, "--federation", federation],
                              capture_output=True, text=True, timeout=60, env=ENV)

    try:
        early = dfl_start()
        assert early.returncode == 1 and "no party has joined yet" in early.stderr
        client.join("a")
        client.join("b")
        done = dfl_start()
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"started federation {federation} at version 0 with 2 parties\n"
        assert agg.status.released
    finally:
        agg.stop()
        agg.wait(10)
        client.b.close()
        with connect(amqp_url) as b:
            t = Topology(federation)
            for q in (t.updates, t.control, t.dead):
                b.delete_queue(q)


def test_an_update_is_applied_with_fedasync_and_broadcast_as_a_new_version(running: Any) -> None:
    _agg, client = running
    client.update("a", 0, 0, value=2.0)
    client.pump(lambda: len(client.models) == 2)
    model = client.models[-1]
    assert model.version == 1
    # w = 1 + alpha(0.5) * S(1) * 2 = 2
    np.testing.assert_array_equal(model.tensors["dense/bias"], np.full(3, 2.0, np.float32))


def test_a_late_party_joins_from_the_current_model(running: Any) -> None:
    agg, client = running
    client.update("a", 0, 0, value=2.0)
    client.pump(lambda: agg.version == 1)
    late = client.join("c")
    assert late.version == 1
    np.testing.assert_array_equal(late.tensors["dense/bias"], np.full(3, 2.0, np.float32))


def test_a_replayed_party_and_seq_is_dropped_as_a_duplicate(running: Any) -> None:
    agg, client = running
    client.update("a", 0, 0)
    client.pump(lambda: agg.version == 1)
    before = snapshot(agg)
    client.update("a", 0, 0)
    client.pump(lambda: agg.status.duplicates == 1)
    assert snapshot(agg) == before and agg.version == 1 and client.dead == []


def body(**fields: Any) -> bytes:
    msg: dict[str, Any] = {"v": SCHEMA_VERSION, "kind": "update", "party": "a", "seq": 5,
                           "base_version": 0, "num_samples": 10,
                           "tensors": [[n, "float32", list(s), np.zeros(s, np.float32).tobytes()]
                                       for n, s in SHAPES.items()]}
    msg.update(fields)
    return msgpack.packb(msg)  # type: ignore[no-any-return]


def tensors_with(**override: Any) -> list[list[Any]]:
    out = []
    for n, s in SHAPES.items():
        dtype, shape = override.get("dtype", "float32"), list(override.get("shape", s))
        data = np.zeros(shape, dtype).tobytes()
        out.append([override.get("prefix", "") + n, dtype, shape, data])
    return out


BAD = [
    (b"\x00\xffgarbage", "not-msgpack"),
    (msgpack.packb("a string"), "not-a-map"),
    (body(v=2), "bad-version"),
    (body(kind="nope"), "unknown-kind"),
    (msgpack.packb({"v": SCHEMA_VERSION, "kind": "update", "party": "a"}), "missing-field"),
    (body(seq="1"), "wrong-type"),
    (body(party="mallory"), "unknown-party"),
    (body(tensors=tensors_with(prefix="x/")), "tensor-names"),
    (body(tensors=tensors_with(shape=(2,))), "shape-mismatch"),
    (body(tensors=tensors_with(dtype="float16")), "dtype-mismatch"),
    (body(tensors=[[n, "complex64", list(s), np.zeros(s, np.complex64).tobytes()]
                   for n, s in SHAPES.items()]), "bad-dtype"),
    (body(tensors=[[n, "float32", list(s), np.full(s, -np.inf, np.float32).tobytes()]
                   for n, s in SHAPES.items()]), "non-finite"),
    (body(tensors=[[n, "float32", list(s), np.full(s, np.nan, np.float32).tobytes()]
                   for n, s in SHAPES.items()]), "non-finite"),
    (body(num_samples=-3), "bad-samples"),
    (body(num_samples=10**12), "bad-samples"),
    (body(party=""), "bad-party"),
    (body(encoding="top-k"), "bad-encoding"),
    (body(encoding="topk", tensors=[[n, "float32", list(s), np.ones(1, "<f4").tobytes(),
                                     np.array([99], "<u4").tobytes()] for n, s in SHAPES.items()]),
     "bad-index"),
    (body(encoding="topk", tensors=[[n, "float32", [1 << 20], np.ones(1, "<f4").tobytes(),
                                     np.zeros(1, "<u4").tobytes()] for n in SHAPES]),
     "too-large"),  # a few bytes that would decode to 4 MiB, over the 64 KiB limit
    (body(encoding="int8", tensors=[[n, "int8", list(s), np.ones(s, "i1").tobytes(), -1.0]
                                    for n, s in SHAPES.items()]), "bad-scale"),
    (body(metrics={"loss": float("inf")}), "non-finite"),
    (body(tensors=[[n, "float32", list(s), np.zeros(s, np.float32).tobytes()]
                   for n, s in SHAPES.items()] + [["extra", "float32", [1], b"\0" * 4]]),
     "tensor-names"),
    (body(tensors=[[n, "float32", list(s), np.zeros(s, np.float32).tobytes()]
                   for n, s in reversed(SHAPES.items())]), "tensor-names"),
    (body(padding=b"\0" * 70_000), "too-large"),
    (body(tensors=[[n, "float32", list(s), np.full(s, 3e38, np.float32).tobytes()]
                   for n, s in SHAPES.items()]), "out-of-range"),
    (body(base_version=7), "future-version"),
    (encode(Join("a", 1, initial())), "wrong-queue"),
    (body(seq=1 << 40), "bad-seq"),  # far past the range the party's join granted
    (body(seq=2**53), "out-of-bounds"),
    (body(v=True), "bad-version"),
    (body(v=1.0), "bad-version"),
    (body(party="a\nb"), "bad-party"),
    (body(metrics={"loss\n": 1.0}), "bad-text"),
    (body(metrics={f"m{i}": 1.0 for i in range(65)}), "too-many"),
]


@pytest.mark.parametrize(("bad", "reason"), BAD, ids=[r for _b, r in BAD])
def test_each_bad_update_is_dead_lettered_with_its_reason_and_changes_nothing(
        running: Any, bad: bytes, reason: str) -> None:
    agg, client = running
    before = snapshot(agg)
    client.send(bad)
    client.pump(lambda: len(client.dead) == 1)
    assert client.dead[0].reason == reason
    assert client.dead[0].body == bad
    assert snapshot(agg) == before and agg.version == 0
    client.pump(lambda: agg.status.rejected[reason] == 1)  # counted once settled
    client.update("a", 0, 0)  # and the service carries on
    client.pump(lambda: agg.version == 1)


@pytest.mark.parametrize("encoding", ["float16", "int8", "topk"])
def test_a_compressed_update_is_applied_as_its_float32_decoding(running: Any,
                                                                 encoding: str) -> None:
    agg, client = running
    sent = Update("a", 0, 0, 100, {n: np.linspace(-1, 2, a.size, dtype=np.float32).reshape(
        a.shape) for n, a in delta(0).items()}, encoding=encoding)
    decoded = decode(encode(sent))
    assert isinstance(decoded, Update)
    client.send(encode(sent))
    client.pump(lambda: agg.version == 1)
    for w, d in zip(agg.weights, decoded.tensors.values(), strict=True):  # 1 + alpha * delta
        np.testing.assert_array_equal(w, np.float32(1) + np.float32(0.5) * d)
    assert client.dead == []


def test_updates_staler_than_max_staleness_are_dead_lettered(running: Any) -> None:
    agg, client = running
    for seq in range(4):
        client.update("a", seq, seq)
    client.pump(lambda: agg.version == 4)
    client.update("b", 0, 0)
    client.pump(lambda: len(client.dead) == 1)
    assert client.dead[0].reason == "stale"


def test_a_party_with_a_different_model_is_refused_at_join(running: Any) -> None:
    _agg, client = running
    welcome = client.join("c", {"other": np.zeros(2, np.float32)})
    assert not welcome.accepted and "model mismatch" in welcome.reason


def test_a_rejoining_party_learns_its_last_seq(running: Any) -> None:
    agg, client = running
    client.update("a", 0, 0)
    client.update("a", 1, 0)
    client.pump(lambda: agg.version == 2)
    assert client.join("a").last_seq == 1


def test_sync_fedavg_waits_for_every_active_party_and_not_for_one_that_left(env: Env) -> None:
    agg = env.start(strategy="fedavg", min_parties=3)
    client = env.client()
    client.listen("a")
    for party in "abc":
        client.join(party)
    client.pump(lambda: len(client.models) == 1)
    client.update("a", 0, 0, value=1.0)
    client.update("b", 0, 0, value=3.0)
    client.b.process_events(0.3)
    assert agg.version == 0  # still waiting for c
    client.b.publish("", client.t.control, encode(Leave("c", "test")))
    client.pump(lambda: agg.version == 1)
    # equal sample counts: w = 1 + mean(1, 3) = 3
    np.testing.assert_array_equal(agg.weights[1], np.full(3, 3.0, np.float32))
    agg.stop()
    agg.wait(10)


def test_the_aggregator_stops_at_its_version_limit_and_broadcasts_stop(env: Env) -> None:
    agg = env.start(max_versions=2, min_parties=1)
    client = env.client()
    client.listen("a")
    client.join("a")
    client.update("a", 0, 0)
    client.update("a", 1, 1)
    assert agg.wait(10)
    assert agg.status.finished == "version limit 2"
    client.pump(lambda: any(isinstance(m, Stop) for m in client.broadcasts))


def test_a_forged_far_ahead_seq_cannot_silence_the_real_party(running: Any) -> None:
    agg, client = running
    seq = client.join("a").next_seq
    client.update("a", seq + (1 << 20), 0)  # forged: past the window of the granted range
    client.pump(lambda: len(client.dead) == 1)
    assert client.dead[0].reason == "bad-seq"
    client.update("a", seq, 0)  # the real party's next update is applied, not a "duplicate"
    client.pump(lambda: agg.version == 1)
    assert agg.status.duplicates == 0


def test_a_forged_x_death_header_is_dead_lettered_without_the_broker_reading_it(
        running: Any) -> None:
    """RabbitMQ 3.10 crashes the source queue when it dead-letters a message whose x-death
    entries are not tables: the aggregator copies such a body to F.dead instead."""
    agg, client = running
    forged = {"x-death": [["not", "a", "table"]], "x-other": "kept?"}
    client.b.publish("", client.t.updates, body(seq=9), headers=forged)
    client.pump(lambda: len(client.dead) == 1)
    [letter] = client.dead
    assert letter.reason == "bad-envelope" and letter.body == body(seq=9)
    assert "x-other" not in letter.headers  # copied without the sender's envelope
    client.update("a", 0, 0)  # and F.updates is still there and served
    client.pump(lambda: agg.version == 1)


def test_an_unexpected_exception_is_an_internal_error_dead_letter_not_a_stop(
        running: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    agg, client = running
    from aggregator import service

    real = service.check_update

    def buggy(message: Any, **kw: Any) -> Any:
        if getattr(message, "seq", None) == 13:
            raise KeyError("a bug this message triggers")
        return real(message, **kw)

    monkeypatch.setattr(service, "check_update", buggy)
    before = snapshot(agg)
    client.update("a", 13, 0)
    client.pump(lambda: len(client.dead) == 1)
    assert client.dead[0].reason == "internal-error" and "KeyError" in client.dead[0].detail
    client.pump(lambda: agg.status.rejected["internal-error"] == 1)
    assert snapshot(agg) == before
    assert agg.metrics.internal_errors._value.get() == 1
    client.update("a", 14, 0)
    client.pump(lambda: agg.version == 1)
    assert agg.error is None


def test_an_unknown_partys_heartbeat_asks_only_that_party_to_rejoin(running: Any) -> None:
    agg, client = running
    ghost: list[Message] = []
    queue = client.t.declare_model_queue(client.b, "ghost")
    client.b.consume(queue, lambda d: ghost.append(decode(d.body)), auto_ack=True)
    seen_by_a = len(client.broadcasts)
    for _ in range(5):
        client.b.publish("", client.t.control, encode(Heartbeat("ghost", 0)))
    client.pump(lambda: any(isinstance(m, Query) for m in ghost))
    client.b.process_events(0.3)
    assert [m.what for m in ghost if isinstance(m, Query)] == ["rejoin"]  # once: rate-limited
    assert not any(isinstance(m, Query) for m in client.broadcasts[seen_by_a:])  # not to a
    assert agg.membership.active == {"a", "b"}  # the live parties were not disturbed


def test_joins_past_max_parties_and_the_join_rate_are_refused(env: Env) -> None:
    agg = env.start(min_parties=1, max_parties=3, join_rate=1000.0)
    client = env.client()
    for party in ("a", "b", "c"):
        assert client.join(party).accepted
    client.b.publish("", client.t.control, encode(Join("d", 100, initial())))
    client.pump(lambda: len(client.dead) == 1)
    assert client.dead[0].reason == "too-many-parties"
    client.b.publish("", client.t.control, encode(Leave("c")))
    assert client.join("d").accepted  # c left: d takes its place
    agg.stop()
    agg.wait(10)
    client.b.close()
    slow = env.start(min_parties=1, join_rate=0.5)  # burst 1: one join, then one per 2 s
    flood = env.client()
    for i in range(20):
        flood.b.publish("", flood.t.control, encode(Join(f"made-up-{i}", 1, initial())))
    flood.pump(lambda: len(flood.dead) >= 19)
    assert {d.reason for d in flood.dead} == {"join-rate"}
    assert slow.status.checkpoints <= 1 and len(slow.membership.parties) == 1
    slow.stop()
    slow.wait(10)


def test_a_finishing_aggregator_leaves_later_updates_queued_not_dead_lettered(env: Env) -> None:
    """Requeueing what arrives while it stops would hand each message straight back, and
    every round trip counts towards the delivery limit: good updates would end in F.dead."""
    agg = env.start(max_versions=1, min_parties=1, staleness="constant", max_staleness=100)
    client = env.client()
    client.join("a")
    for seq in range(20):
        client.update("a", seq, 0)
    assert agg.wait(10)
    client.b.process_events(0.5)
    assert client.dead == []
    client.pump(lambda: client.b.queue_depth(client.t.updates) == 19)


def test_a_checkpoint_that_cannot_be_written_stops_the_aggregator_with_one_line(
        env: Env, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one failure that may stop it while it handles a message: its own state."""
    from aggregator.checkpoint import CheckpointStore

    agg = env.start(min_parties=1, checkpoint_dir=str(tmp_path))
    client = env.client()
    client.join("a")

    def full(*_a: Any, **_k: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(CheckpointStore, "save", full)
    client.update("a", 0, 0)
    with pytest.raises(StateError, match=r"cannot write a checkpoint .* No space left") as info:
        agg.wait(10)
    assert "\n" not in str(info.value)
    client.b.close()


def test_updates_of_one_party_out_of_order_are_each_applied_once(running: Any) -> None:
    """RabbitMQ returns a dead consumer's deliveries out of order (tests/test_dedupe.py):
    seq 1 arriving before seq 0 must not make seq 0 a duplicate."""
    agg, client = running
    client.update("a", 1, 0)
    client.update("a", 0, 0)
    client.pump(lambda: agg.version == 2)
    client.update("a", 0, 0)  # replays of both: duplicates now
    client.update("a", 1, 0)
    client.pump(lambda: agg.status.duplicates == 2)
    assert agg.version == 2 and agg.status.updates == 2


def test_past_push_max_parties_versions_are_announced_and_fetched(env: Env) -> None:
    """aggregator.distribution: with more active parties than --push-max-parties the fanout
    carries versions only; a party fetches the newest model, encoded and signed once per
    version for every fetch."""
    agg = env.start(push_max_parties=1, mixing_alpha=0.5, staleness="constant")
    client = env.client()
    client.listen("a")
    client.join("a")
    welcome = client.join("b")  # the second join releases version 0, to 2 > 1 parties
    assert welcome.version == 0 and welcome.tensors == {}  # b fetches it
    client.pump(lambda: len(client.models) == 1)
    announced = client.models[0]
    assert announced.version == 0 and announced.tensors == {}

    def fetch() -> tuple[Model, bytes]:
        reply = client.b.call(client.t.control, encode(Query("model")), timeout=5,
                              exchange=client.t.ingress)
        msg = decode(reply.body)
        assert isinstance(msg, Model)
        return msg, reply.body

    model, body = fetch()
    assert model.version == 0 and list(model.tensors) == list(SHAPES)
    assert fetch()[1] == body  # the same bytes again (a new encoding has a new created_at)
    client.update("a", 0, 0, value=2.0)
    client.pump(lambda: len(client.models) == 2)
    assert client.models[1].version == 1 and client.models[1].tensors == {}
    newer, _ = fetch()
    assert newer.version == 1
    assert np.allclose(newer.tensors["dense/bias"], 1.0 + 0.5 * 2.0)
    agg.stop()
    agg.wait(10)
    client.b.close()
