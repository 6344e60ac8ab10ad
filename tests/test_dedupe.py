"""Exact duplicate detection in any delivery order (aggregator.dedupe)."""

from __future__ import annotations

import contextlib
import random
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.dedupe import AppliedSeqs
from aggregator.validation import check_update
from messages.wire.kinds import Update


def test_a_later_update_taken_first_does_not_make_an_earlier_one_a_duplicate() -> None:
    """The chaos test's loss: 0#...889 came back before 0#...888 after a kill."""
    seqs = AppliedSeqs()
    seqs.add("0", 3 << 32 | 1)
    assert not seqs.holds("0", 3 << 32)
    seqs.add("0", 3 << 32)
    assert seqs.holds("0", 3 << 32) and seqs.holds("0", 3 << 32 | 1)
    assert seqs.last("0") == 3 << 32 | 1 and seqs.lasts() == {"0": 3 << 32 | 1}


def test_check_update_takes_the_earlier_update_and_drops_the_replayed_one() -> None:
    import numpy as np
    applied = AppliedSeqs()
    spec = (("w", "float32", (2,)),)

    def check(seq: int) -> Update | None:
        return check_update(Update("p", seq, 0, 10, {"w": np.zeros(2, np.float32)}),
                            parties={"p"}, spec=spec, version=0, max_staleness=5,
                            applied=applied, granted={"p": 1})

    applied.add("p", (1 << 32) + 1)
    assert check(1 << 32) is not None  # earlier, never applied: taken
    applied.add("p", 1 << 32)
    assert check(1 << 32) is None and check((1 << 32) + 1) is None  # both duplicates now


@given(st.lists(st.integers(0, 300), unique=True, min_size=1, max_size=200),
       st.randoms(use_true_random=False))
def test_any_order_within_the_window_is_exact(seqs: list[int], rnd: random.Random) -> None:
    """Delivered in any order whose displacement stays under ``keep``: every seq is taken
    exactly once, and the checkpointed state answers the same."""
    order = sorted(seqs)
    # displace each seq at most keep - 1 places (a returned prefetch window, not a reshuffle)
    keep = 64
    for i in range(len(order) - 1, 0, -1):
        j = max(0, i - rnd.randrange(keep // 2))
        order[i], order[j] = order[j], order[i]
    applied = AppliedSeqs(keep)
    for s in order:
        assert not applied.holds("p", s), s
        applied.add("p", s)
        assert applied.holds("p", s)
    again = AppliedSeqs.restore(msgpack.unpackb(msgpack.packb(applied.state())), {}, keep)
    assert all(again.holds("p", s) for s in seqs)
    assert again.last("p") == max(seqs)
    assert not again.holds("p", max(seqs) + 1)


def test_memory_is_bounded_per_party_and_old_seqs_count_as_taken() -> None:
    applied = AppliedSeqs(keep=4)
    for s in range(10):
        applied.add("p", s)
    floor, *recent = applied.state()["p"]
    assert (floor, recent) == (5, [6, 7, 8, 9])
    assert applied.holds("p", 0) and applied.holds("p", 5) and not applied.holds("p", 10)


def test_a_checkpoint_before_exact_dedupe_restores_its_high_water_mark() -> None:
    applied = AppliedSeqs.restore({}, {"a": 7})
    assert applied.holds("a", 7) and applied.holds("a", 3) and not applied.holds("a", 8)
    assert applied.last("a") == 7


@pytest.mark.rabbitmq
def test_rabbitmq_returns_two_consumers_unacked_deliveries_out_of_order(
        amqp_url: str, federation: str) -> None:
    """Why the high-water mark was not enough, shown on the real broker: one channel with two
    consumers on a quorum queue (the aggregator's probation consumer and its wider one) holds
    deliveries 1-4 (B) and 5 (A); when the connection dies, RabbitMQ 3.10 may put 5 back
    ahead of 1-4. The aggregator must then take 1-4 after 5."""
    import pika

    params = pika.URLParameters(amqp_url)
    queue = f"{federation}.order"
    with contextlib.closing(pika.BlockingConnection(params)) as setup:
        ch = setup.channel()
        ch.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        ch.confirm_delivery()
        try:
            orders = []
            for _ in range(10):  # the order is the broker's choice: try until it shows
                ch.queue_purge(queue)
                for i in range(10):
                    ch.basic_publish("", queue, str(i).encode())
                orders.append(_held_then_returned(params, queue))
                if orders[-1] != sorted(orders[-1]):
                    break
            assert all(sorted(o) == list(range(1, 10)) for o in orders)  # none lost
            assert any(o != sorted(o) for o in orders), orders
        finally:
            ch.queue_delete(queue)


def _held_then_returned(params: Any, queue: str) -> list[int]:
    import pika

    with contextlib.closing(pika.BlockingConnection(params)) as conn:
        ch = conn.channel()
        held: list[tuple[str, int, int]] = []
        ch.basic_qos(prefetch_count=1)
        ch.basic_consume(queue, lambda _c, m, _p, b: held.append(("A", int(b), m.delivery_tag)))
        while not held:
            conn.process_data_events(0.05)
        ch.basic_qos(prefetch_count=4)
        ch.basic_consume(queue, lambda _c, m, _p, b: held.append(("B", int(b), m.delivery_tag)))
        while len(held) < 5:
            conn.process_data_events(0.05)
        ch.basic_ack(held[0][2])  # A's first: A takes the next one, behind B's four
        while len(held) < 6:
            conn.process_data_events(0.05)
    returned: list[int] = []
    with contextlib.closing(pika.BlockingConnection(params)) as conn:
        ch = conn.channel()
        while (got := ch.basic_get(queue, auto_ack=True))[0] is not None:
            returned.append(int(got[2]))
    return returned
