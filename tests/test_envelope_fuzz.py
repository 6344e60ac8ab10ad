"""An AMQP-level fuzzer against the running aggregator on the real RabbitMQ.

Messages are written byte by byte (``tests.amqp_raw``, no pika on the sending side), so the
envelope can be anything the broker accepts: every AMQP field-table type at the extremes of
its range (doubles, floats, decimals, timestamps up to 2**64-1), nested tables and arrays
(up to several hundred deep), byte arrays, long strings, non-UTF-8 keys, our own header names
with the wrong types, header tables up to the frame size, and odd ``reply_to`` /
``correlation_id`` bytes; bodies range from valid updates to garbage. Each example must end
in exactly one way (applied, duplicate or dead-lettered; or refused by the broker at publish),
the aggregator must keep consuming, and the model must change only for a valid update.

Examples: 10,000 on the updates queue under ``CI`` (200 otherwise; ``DFL_FUZZ_EXAMPLES``
overrides), a quarter of that on the control queue, and a sixteenth on chunked messages: their
space is small (8 kinds of damage x 3 senders, with the header tables the updates fuzzer
already covers), and every example whose set cannot complete waits out the 1 s chunk timeout,
so that at a quarter this one property took 14 min of a CI run (862 s on 2026-12-08).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator import Aggregator, AggregatorConfig
from aggregator.outcomes import DeliveryEvent, Ending
from messages.transport.connect import connect
from messages.transport.topology import Topology
from messages.wire.chunks import split
from messages.wire.codec import encode
from messages.wire.kinds import Heartbeat, Leave, Query, Update
from tests import amqp_raw as raw
from tests.test_aggregator_service import Client, delta

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

EXAMPLES = int(os.environ.get("DFL_FUZZ_EXAMPLES") or (10_000 if os.environ.get("CI") else 200))
CHUNK = 4096
FRAME_ROOM = 131_000  # a header table this large still fits RabbitMQ's frame (131,072)
OUR_HEADERS = [b"x-dfl-chunk-id", b"x-dfl-chunk-index", b"x-dfl-chunk-count",
               b"x-dfl-chunk-total", b"x-dfl-chunk-sha256", b"x-dfl-chunk-from",
               b"x-dfl-signer", b"x-dfl-signature", b"x-dfl-alg", b"x-dfl-envelope-error",
               b"x-delivery-count", b"x-death"]


# -- envelopes --------------------------------------------------------------------------------
_f32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
_f64 = st.floats(allow_nan=False, allow_infinity=False)
_extreme_ints = st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63)])
scalars: st.SearchStrategy[raw.Field] = st.one_of(
    st.integers(0, 255).map(raw.bool_),
    st.integers(-128, 127).map(raw.int8), st.integers(0, 255).map(raw.uint8),
    st.integers(-(2**15), 2**15 - 1).map(raw.int16), st.integers(0, 2**16 - 1).map(raw.uint16),
    st.integers(-(2**31), 2**31 - 1).map(raw.int32), st.integers(0, 2**32 - 1).map(raw.uint32),
    st.one_of(_extreme_ints, st.integers(-(2**63), 2**63 - 1)).map(raw.int64),
    st.one_of(_f32, st.sampled_from([3.4e38, -3.4e38, 1e-45])).map(raw.f32),
    st.one_of(_f64, st.sampled_from([1.7e308, -1.7e308, 5e-324])).map(raw.f64),
    st.one_of(st.sampled_from([0, 2**63, 2**64 - 1, 253402300800]),
              st.integers(0, 2**64 - 1)).map(raw.timestamp),
    st.tuples(st.integers(0, 255), st.integers(-(2**31), 2**31 - 1)).map(
        lambda t: raw.decimal(*t)),
    st.binary(max_size=64).map(raw.longstr), st.binary(max_size=64).map(raw.bytes_),
    st.just(raw.void()),
)
keys = st.one_of(st.sampled_from(OUR_HEADERS), st.binary(max_size=40))


def nested(depth: int) -> raw.Field:
    """A table ``depth`` deep (pika's decoder recurses once per level)."""
    value = raw.int8(1)
    for _ in range(depth):
        value = raw.table([(b"n", *value)])
    return value


values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(raw.array),
        st.lists(st.tuples(keys, inner), max_size=4).map(
            lambda items: raw.table([(k, *v) for k, v in items]))),
    max_leaves=12)
entries = st.lists(st.tuples(keys, values), max_size=8)


@st.composite
def header_tables(draw: st.DrawFn) -> bytes | None:
    """An encoded header table: typed entries, sometimes very deep, sometimes near the frame."""
    if draw(st.integers(0, 9)) == 0:
        return None
    items = [(k, *v) for k, v in draw(entries)]
    extra = draw(st.sampled_from(["none"] * 6 + ["deep", "big", "frame"]))
    if extra == "deep":
        items.append((b"deep", *nested(draw(st.sampled_from([50, 300, 600, 700])))))
    elif extra in ("big", "frame"):
        size = FRAME_ROOM - 2048 if extra == "frame" else draw(st.integers(1, 100_000))
        items.append((draw(keys), *raw.longstr(b"\xa5" * size)))
    table = raw.field_table(items)
    return table if len(table) <= FRAME_ROOM else None


shortstrs = st.one_of(st.none(), st.binary(max_size=255),
                      st.sampled_from([b"amq.rabbitmq.reply-to.nope", b"\xff\xfe", b""]))


# -- the federation under test ----------------------------------------------------------------
@dataclass
class Federation:
    agg: Aggregator
    client: Client
    topology: Topology
    events: list[DeliveryEvent] = field(default_factory=list)
    seq: int = 0
    publisher: raw.RawPublisher | None = None
    counts: dict[str, int] = field(default_factory=dict)
    outages: list[str] = field(default_factory=list)  # the supervisor's reconnect lines

    def publish(self, queue: str, body: bytes, headers: bytes | None, **props: Any) -> str:
        if self.publisher is None or self.publisher.closed:
            if self.publisher is not None:
                self.publisher.close()
            self.publisher = raw.RawPublisher(timeout=10)
            self.publisher.connect()
        return self.publisher.publish("", queue, body, headers_raw=headers, **props)

    def settle(self, before: int, deliveries: int, received: int) -> list[DeliveryEvent]:
        """Wait until the aggregator has ended what was just published (``deliveries``
        messages, its broker having received ``received`` before them); its events."""
        deadline = time.monotonic() + 15
        broker = None
        while True:
            assert self.agg.error is None, f"the aggregator stopped: {self.agg.error!r}"
            broker = self.agg._broker  # read only: it belongs to the aggregator's thread
            ended = len(self.events) - before
            # every one of them reached the aggregator and none is left half-handled: an
            # earlier example's late dead letter alone must not end this one's wait
            if broker is not None and broker.deliveries - received >= deliveries and ended >= 1 \
                    and broker.held == 0 and not broker._unsettled and (
                    ended >= deliveries
                    or self.client.b.queue_depth(self.topology.updates) == 0):
                return self.events[before:]
            assert time.monotonic() < deadline, (
                f"the aggregator did not end a message: {ended} events, held "
                f"{getattr(broker, 'held', '?')}")
            self.client.b.process_events(0.002)  # and keep the client's heartbeats going

    def next_update(self, value: float = 0.01) -> bytes:
        self.seq += 1
        return encode(Update("a", self.seq, self.agg.version, 100, delta(value)))

    def tally(self, events: list[DeliveryEvent]) -> None:
        for e in events:
            name = e.ending.value + (f":{e.reason}" if e.reason else "")
            self.counts[name] = self.counts.get(name, 0) + 1


@pytest.fixture(scope="module")
def fed(amqp_url: str) -> Iterator[Federation]:
    federation = f"fz{os.urandom(4).hex()}"
    topology = Topology(federation)
    agg = Aggregator(AggregatorConfig(
        broker=amqp_url, federation=federation, evaluate=False, min_parties=1,
        strategy="fedasync", staleness="constant", mixing_alpha=0.5, max_staleness=10**6,
        max_message_bytes=256 * 1024, max_chunk_bytes=CHUNK, chunk_timeout=1.0,
        join_rate=1000.0)).start()
    client = Client(amqp_url, topology, collect_dead=False)  # F.dead is bounded: leave it
    welcome = client.join("a")
    f = Federation(agg, client, topology, seq=welcome.next_seq - 1)
    agg.observers.add(f.events.append)

    class Outages(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            f.outages.append(record.getMessage())

    watch = Outages(logging.WARNING)
    logging.getLogger("dfl.supervisor").addHandler(watch)
    client.pump(lambda: agg.version == 0)
    yield f
    print("fuzz outcomes:", dict(sorted(f.counts.items())))
    logging.getLogger("dfl.supervisor").removeHandler(watch)
    agg.stop()
    agg.wait(10)
    if f.publisher is not None:
        f.publisher.close()
    client.b.close()
    with connect(amqp_url) as b:
        for q in (topology.updates, topology.control, topology.dead):
            b.delete_queue(q)


def check_example(fed: Federation, send: Callable[[], tuple[list[str], bool]]) -> None:
    """Run one example: ``send`` publishes and says what it published (the broker's answer
    per message) and whether its body was a valid update."""
    before_weights = [w.copy() for w in fed.agg.weights]
    before_version, before_events = fed.agg.version, len(fed.events)
    received = fed.agg._broker.deliveries if fed.agg._broker is not None else 0
    answers, valid = send()
    accepted = answers.count("ack")
    if accepted == 0:  # refused by the broker at publish: nothing reached the aggregator
        assert fed.agg.error is None
        fed.counts["refused-by-broker"] = fed.counts.get("refused-by-broker", 0) + 1
        return
    events = fed.settle(before_events, accepted, received)
    fed.tally(events)
    assert all(e.ending in Ending for e in events)
    applied = [e for e in events if e.ending is Ending.APPLIED and e.kind == "update"]
    if applied:
        assert valid, f"an invalid body was applied: {events}"
        assert fed.agg.version == before_version + len(applied)
    else:
        assert fed.agg.version == before_version
        assert all(np.array_equal(a, b) for a, b in zip(before_weights, fed.agg.weights,
                                                        strict=True))


FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


@FUZZ
@given(headers=header_tables(), body_kind=st.sampled_from(
    ["valid", "valid", "valid", "flipped", "garbage", "truncated"]),
    garbage=st.binary(max_size=200), at=st.integers(0, 10**6),
    reply_to=shortstrs, correlation_id=shortstrs)
def test_every_envelope_on_the_updates_queue_ends_in_one_outcome(
        fed: Federation, headers: bytes | None, body_kind: str, garbage: bytes, at: int,
        reply_to: bytes | None, correlation_id: bytes | None) -> None:
    def send() -> tuple[list[str], bool]:
        body = fed.next_update()
        if body_kind == "flipped":
            i = at % len(body)
            body = body[:i] + bytes([body[i] ^ 0x5A]) + body[i + 1:]
        elif body_kind == "garbage":
            body = garbage
        elif body_kind == "truncated":
            body = body[:at % len(body)]
        return [fed.publish(fed.topology.updates, body, headers, reply_to=reply_to,
                            correlation_id=correlation_id)], body_kind != "garbage"

    check_example(fed, send)


@settings(FUZZ, max_examples=max(50, EXAMPLES // 4))
@given(headers=header_tables(), kind=st.sampled_from(
    ["heartbeat", "leave-unknown", "status", "garbage", "join-mallory"]),
    garbage=st.binary(max_size=200), reply_to=shortstrs, correlation_id=shortstrs)
def test_every_envelope_on_the_control_queue_ends_in_one_outcome(
        fed: Federation, headers: bytes | None, kind: str, garbage: bytes,
        reply_to: bytes | None, correlation_id: bytes | None) -> None:
    bodies = {"heartbeat": encode(Heartbeat("a", fed.agg.version)),
              "leave-unknown": encode(Leave("nobody")), "status": encode(Query("status")),
              "garbage": garbage,
              "join-mallory": encode(Update("mallory", 1, 0, 1, delta(1.0)))}

    def send() -> tuple[list[str], bool]:
        return [fed.publish(fed.topology.control, bodies[kind], headers, reply_to=reply_to,
                            correlation_id=correlation_id)], False

    check_example(fed, send)
    assert "a" in fed.agg.membership.active  # nothing here may disturb the live party


@settings(FUZZ, max_examples=max(50, EXAMPLES // 16))
@given(headers=st.lists(st.tuples(keys, scalars), max_size=3), damage=st.sampled_from(
    ["none", "none", "drop-one", "swap-index", "bad-count", "bad-sha", "huge-total", "dup"]),
    chunks_from=st.sampled_from([None, "a", "b"]))
def test_every_chunked_message_ends_in_one_outcome(
        fed: Federation, headers: list[tuple[bytes, raw.Field]], damage: str,
        chunks_from: str | None) -> None:
    def send() -> tuple[list[str], bool]:
        body = fed.next_update(0.001)
        plan = split(body, 256, sender=chunks_from)
        answers = []
        order = list(range(len(plan)))
        if damage == "drop-one":
            order = order[:-1]
        if damage == "dup":
            order = [*order, 0]
        for i in order:
            chunk, h = plan.chunk(i)
            h = dict(h)
            if damage == "swap-index" and i == 0:
                h["x-dfl-chunk-index"] = len(plan) - 1
            if damage == "bad-count":
                h["x-dfl-chunk-count"] = len(plan) + 1
            if damage == "bad-sha":
                h["x-dfl-chunk-sha256"] = "0" * 64
            if damage == "huge-total":
                h["x-dfl-chunk-total"] = 2**40
            items = [(k.encode(), *_field(v)) for k, v in h.items()]
            items += [(k, *v) for k, v in headers if k not in {x[0] for x in items}]
            answers.append(fed.publish(fed.topology.updates, chunk, raw.field_table(items)))
        return answers, True

    check_example(fed, send)


def _field(value: object) -> raw.Field:
    if isinstance(value, bool):
        return raw.bool_(int(value))
    if isinstance(value, int):
        return raw.int64(value)
    return raw.longstr(str(value).encode())


def test_the_fuzzer_saw_every_ending_and_valid_updates_applied(fed: Federation) -> None:
    """Runs after the fuzz tests of this module: the examples reached every outcome."""
    names = set(fed.counts)
    assert "applied" in names and any(n.startswith("dead-lettered:") for n in names), names
    assert "dead-lettered:bad-envelope" in names, names
    assert fed.outages == []  # no message made the aggregator reconnect
