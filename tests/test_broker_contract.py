"""One behaviour suite, run against memory:// and real RabbitMQ (see conftest.broker_url)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from messages.errors import AccessRefused, PublishRejected, RpcTimeout
from messages.transport.broker import Broker, Delivery
from messages.wire.deadletters import RECORD_HEADER, read_dead
from tests.conftest import Brokers


def pump(broker: Broker, done: Callable[[], bool], timeout: float = 5.0) -> None:
    """Run the broker's event loop until ``done()`` or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out waiting for the broker"
        broker.process_events(0.05)


def collect(broker: Broker, queue: str, *, ack: bool = True, prefetch: int = 0
            ) -> list[Delivery]:
    got: list[Delivery] = []

    def handler(d: Delivery) -> None:
        got.append(d)
        if ack:
            broker.ack(d)

    broker.consume(queue, handler, prefetch=prefetch)
    return got


def test_a_published_message_reaches_its_consumer_with_headers(brokers: Brokers) -> None:
    b = brokers.open()
    brokers.topology.declare(b)
    b.publish("", brokers.topology.updates, b"hello", headers={"party": "p1", "n": 3},
              mandatory=True)
    got = collect(b, brokers.topology.updates)
    pump(b, lambda: len(got) == 1)
    assert got[0].body == b"hello"
    assert got[0].headers["party"] == "p1" and got[0].headers["n"] == 3
    assert not got[0].redelivered


def test_acked_messages_are_gone_and_the_queue_is_empty(brokers: Brokers) -> None:
    b = brokers.open()
    brokers.topology.declare(b)
    for i in range(3):
        b.publish("", brokers.topology.updates, bytes([i]))
    got = collect(b, brokers.topology.updates)
    pump(b, lambda: len(got) == 3)
    assert [d.body for d in got] == [b"\x00", b"\x01", b"\x02"]
    b.close()
    other = brokers.open()
    assert other.queue_depth(brokers.topology.updates) == 0


def test_a_nacked_message_is_dead_lettered_with_the_rejected_reason(brokers: Brokers) -> None:
    b = brokers.open()
    t = brokers.topology
    t.declare(b)
    b.publish("", t.updates, b"bad")
    b.consume(t.updates, lambda d: b.nack(d, requeue=False))
    dead = collect(b, t.dead)
    pump(b, lambda: len(dead) == 1)
    assert dead[0].body == b"bad"
    assert dead[0].headers["x-death"][0]["reason"] == "rejected"
    assert dead[0].headers["x-first-death-queue"] == t.updates


def test_dead_letter_keeps_the_original_bytes_and_records_the_reason_beside_it(
        brokers: Brokers) -> None:
    b = brokers.open()
    t = brokers.topology
    t.declare(b)
    b.publish("", t.updates, b"\xc1garbage", headers={"x-any": "thing"})
    b.consume(t.updates, lambda d: t.dead_letter(b, d, "not-msgpack", "x", "alice"))
    dead = collect(b, t.dead)
    pump(b, lambda: len(dead) == 2)
    assert RECORD_HEADER in dead[0].headers  # the reason first, then the message itself
    [letter] = read_dead((d.body, d.headers) for d in dead)
    assert letter.body == b"\xc1garbage" and letter.headers["x-any"] == "thing"
    assert (letter.reason, letter.detail, letter.party) == ("not-msgpack", "x", "alice")
    assert letter.queue == t.updates
    b.close()
    assert brokers.open().queue_depth(t.updates) == 0


def test_a_quorum_queue_dead_letters_a_message_past_its_delivery_limit(
        brokers: Brokers) -> None:
    b = brokers.open()
    t = brokers.topology
    t.declare(b)
    b.publish("", t.updates, b"poison")
    seen: list[int] = []

    def give_back(d: Any) -> None:
        seen.append(int(d.headers.get("x-delivery-count", 0)))
        b.nack(d, requeue=True)

    b.consume(t.updates, give_back)
    dead = collect(b, t.dead)
    pump(b, lambda: len(dead) == 1)
    assert seen == list(range(t.delivery_limit + 1))
    [letter] = read_dead((d.body, d.headers) for d in dead)
    assert (letter.body, letter.reason) == (b"poison", "delivery-limit")


def test_unacked_messages_are_redelivered_after_the_consumer_closes(brokers: Brokers) -> None:
    t = brokers.topology
    first = brokers.open()
    t.declare(first)
    for i in range(2):
        first.publish("", t.updates, bytes([i]))
    got = collect(first, t.updates, ack=False, prefetch=10)
    pump(first, lambda: len(got) == 2)
    first.close()
    second = brokers.open()
    again = collect(second, t.updates)
    pump(second, lambda: len(again) == 2)
    assert sorted(d.body for d in again) == [b"\x00", b"\x01"]
    assert all(d.redelivered for d in again)


def test_prefetch_bounds_the_unacked_deliveries(brokers: Brokers) -> None:
    b = brokers.open()
    t = brokers.topology
    t.declare(b)
    for i in range(5):
        b.publish("", t.updates, bytes([i]))
    got = collect(b, t.updates, ack=False, prefetch=2)
    pump(b, lambda: len(got) == 2)
    b.process_events(0.3)
    assert len(got) == 2
    b.ack(got[-1], multiple=True)
    pump(b, lambda: len(got) == 4)


def test_fanout_reaches_every_bound_queue(brokers: Brokers) -> None:
    b = brokers.open()
    t = brokers.topology
    t.declare(b)
    queues = [t.declare_model_queue(b, p) for p in ("a", "b", "c")]
    b.publish(t.models, "", b"model-1")
    inboxes = [collect(b, q) for q in queues]
    pump(b, lambda: all(len(i) == 1 for i in inboxes))
    assert all(i[0].body == b"model-1" for i in inboxes)


def test_a_max_length_one_drop_head_queue_keeps_only_the_newest(brokers: Brokers) -> None:
    b = brokers.open()
    t = brokers.topology
    t.declare(b)
    q = t.declare_model_queue(b, "slow")
    for v in range(5):
        b.publish(t.models, "", f"v{v}".encode(), persistent=False)
    assert b.queue_depth(q) == 1
    newest = b.get(q)
    assert newest is not None and newest.body == b"v4"
    assert b.get(q) is None


def test_a_full_reject_publish_queue_refuses_the_publish(brokers: Brokers) -> None:
    from messages.transport.topology import Topology

    t = Topology(brokers.topology.federation, updates_max_length=2)
    b = brokers.open()
    t.declare(b)
    accepted = 0
    for i in range(5):
        try:
            b.publish("", t.updates, bytes([i]))
            accepted += 1
        except PublishRejected:
            pass
    # Quorum queues apply the limit softly (the publish that crosses it still goes in).
    assert accepted in (2, 3)
    assert b.queue_depth(t.updates) == accepted


def test_redeclaring_a_queue_with_other_arguments_is_refused(brokers: Brokers) -> None:
    b = brokers.open()
    brokers.topology.declare(b)
    with pytest.raises(AccessRefused):
        b.declare_queue(brokers.topology.updates, arguments={"x-queue-type": "classic"})


def test_publishing_mandatory_to_a_missing_queue_is_refused(brokers: Brokers) -> None:
    b = brokers.open()
    with pytest.raises(PublishRejected):
        b.publish("", brokers.queue("nowhere"), b"x", mandatory=True)


def test_an_rpc_gets_its_reply(brokers: Brokers) -> None:
    t = brokers.topology
    server = brokers.open()
    t.declare(server)
    server.consume(t.control, lambda d: (server.reply(d, d.body.upper()), server.ack(d)))
    client = brokers.open()
    import threading

    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            server.process_events(0.05)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        reply = client.call(t.control, b"join", timeout=5)
        assert reply.body == b"JOIN"
    finally:
        stop.set()
        thread.join()


def test_an_rpc_without_a_server_times_out(brokers: Brokers) -> None:
    t = brokers.topology
    client = brokers.open()
    t.declare(client)
    with pytest.raises(RpcTimeout):
        client.call(t.control, b"join", timeout=0.3)


def test_callbacks_from_other_threads_run_on_the_loop_thread(brokers: Brokers) -> None:
    import threading

    b = brokers.open()
    ran: list[str] = []
    threading.Thread(target=lambda: b.call_soon_threadsafe(
        lambda: ran.append(threading.current_thread().name))).start()
    pump(b, lambda: bool(ran))
    assert ran == [threading.current_thread().name]


def test_float_headers_are_refused_on_both_brokers(brokers: Brokers) -> None:
    b = brokers.open()
    brokers.topology.declare(b)
    with pytest.raises(ValueError):
        b.publish("", brokers.topology.updates, b"x", headers={"lr": 0.1})
