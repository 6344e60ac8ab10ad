"""``dfl dead list|replay|purge`` against memory:// and RabbitMQ.

memory:// lives in this process, so the command runs through ``deploy.dead.main`` here; one
RabbitMQ test also runs the installed ``dfl`` as a process. Dead letters are made the way the
aggregator makes them: a reason record beside the original (``Topology.dead_letter``), and a
poison message the broker dead-letters itself at the delivery limit (no record).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from urllib.parse import unquote, urlparse

import pytest

from deploy import dead
from messages.transport.broker import Broker, Delivery
from messages.wire.deadletters import RECORD_HEADER
from tests.conftest import Brokers
from tests.processes import ENV, dfl

BODY = b"\xc1garbage\x00\xff"
"""Not UTF-8, not msgpack: it must come back byte for byte."""
LETTERS = {  # body -> (queue attribute, reason, detail, party)
    BODY: ("updates", "not-msgpack", "x" * 600, "alice"),
    b"forged": ("updates", "bad-signature", "signature does not verify", "bob"),
    b"join?": ("control", "bad-join", "", "carol"),
}
POISON = b"poison"
DEPTH = 2 * len(LETTERS) + 1  # a record and a message each, and the poison without a record


def pump(broker: Broker, done: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out waiting for the broker"
        broker.process_events(0.05)


def wait_depth(brokers: Brokers, queue: str, depth: int, timeout: float = 10.0) -> None:
    """RabbitMQ gives a closed connection's unacked messages back asynchronously."""
    with brokers.open() as b:
        deadline = time.monotonic() + timeout
        while (now := b.queue_depth(queue)) != depth:
            assert time.monotonic() < deadline, f"{queue} holds {now} messages, not {depth}"
            time.sleep(0.05)


Extra = Callable[[Broker], tuple[int, dict[bytes, str]]]


def fill(brokers: Brokers, extra: Extra | None = None) -> None:
    """Dead-letter the LETTERS (with records) and POISON (at the delivery limit). ``extra``
    publishes more messages and returns how many, and the reasons of those to dead-letter with
    a record (by body); the others go the poison's way."""
    t = brokers.topology
    b = brokers.open()
    t.declare(b)
    b.publish(t.ingress, t.updates, BODY, headers={"x-any": "thing", "n": 7,
                                                   "nested": {"k": [1, b"\x00"]}})
    b.publish(t.ingress, t.updates, b"forged", headers={"x-dfl-signer": "bob"})
    b.publish(t.ingress, t.control, b"join?")
    b.publish(t.ingress, t.updates, POISON)
    more, reasons = extra(b) if extra is not None else (0, {})

    def handle(d: Delivery) -> None:
        if d.body in LETTERS:
            _queue, reason, detail, party = LETTERS[d.body]
            t.dead_letter(b, d, reason, detail, party)
        elif d.body in reasons:
            t.dead_letter(b, d, reasons[d.body])
        else:
            b.nack(d, requeue=True)  # POISON: until the broker dead-letters it

    b.consume(t.updates, handle, prefetch=1)
    b.consume(t.control, handle, prefetch=1)
    total = DEPTH + more + 2 * len(reasons)  # a record and a message each
    pump(b, lambda: b.queue_depth(t.dead) == total)
    b.close()
    wait_depth(brokers, t.dead, total)


def run(brokers: Brokers, *args: str, stdin: str | None = None,
        monkeypatch: pytest.MonkeyPatch | None = None) -> int:
    if monkeypatch is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin or ""))
    return dead.main([args[0], "--broker", brokers.url, "--federation",
                      brokers.topology.federation, "--timeout", "2", *args[1:]])


def listed(brokers: Brokers, capsys: pytest.CaptureFixture[str], *args: str
           ) -> list[dict[str, object]]:
    capsys.readouterr()
    assert run(brokers, "list", "--json", *args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert isinstance(rows, list)
    return rows


def drain(brokers: Brokers, queue: str, n: int) -> list[Delivery]:
    b = brokers.open()
    got: list[Delivery] = []

    def take(d: Delivery) -> None:
        got.append(d)
        b.ack(d)

    b.consume(queue, take)
    pump(b, lambda: len(got) >= n)
    b.close()  # no consumer left behind to take what comes next
    return got


def test_list_shows_every_dead_message_and_takes_none(
        brokers: Brokers, capsys: pytest.CaptureFixture[str]) -> None:
    t = brokers.topology
    fill(brokers)
    rows = listed(brokers, capsys)
    wait_depth(brokers, t.dead, DEPTH)  # nothing taken: records and messages are all back
    by_reason = {r["reason"]: r for r in rows}
    assert len(rows) == len(LETTERS) + 1 and set(by_reason) == {
        "not-msgpack", "bad-signature", "bad-join", "delivery-limit"}
    for body, (queue, reason, detail, party) in LETTERS.items():
        row = by_reason[reason]
        assert (row["party"], row["queue"], row["size"], row["count"], row["detail"]) == (
            party, getattr(t, queue), len(body), 1, detail[:500])
        assert datetime.fromisoformat(str(row["time"])).utcoffset() == timedelta(0)
    poison = by_reason["delivery-limit"]
    assert (poison["queue"], poison["size"], poison["party"]) == (t.updates, len(POISON), "")
    again = listed(brokers, capsys)  # a second look sees the same messages, in the same order
    assert [r["key"] for r in again] == [r["key"] for r in rows]
    wait_depth(brokers, t.dead, DEPTH)

    assert run(brokers, "list") == 0  # the table
    out = capsys.readouterr().out
    assert all(reason in out for reason in by_reason) and "x" * 60 not in out
    assert f"{len(rows)} dead messages in {t.dead}" in out
    wait_depth(brokers, t.dead, DEPTH)

    limited = listed(brokers, capsys, "--limit", "1", "--reason", "bad-join")
    assert [r["reason"] for r in limited] == ["bad-join"]
    wait_depth(brokers, t.dead, DEPTH)
    assert run(brokers, "list", "--json", "--limit", "2") == 0
    out, err = capsys.readouterr()
    assert len(json.loads(out)) == 2 and "2 more not shown (--limit)" in err
    wait_depth(brokers, t.dead, DEPTH)


def test_purge_removes_only_the_matching_messages_and_their_records(
        brokers: Brokers, capsys: pytest.CaptureFixture[str]) -> None:
    t = brokers.topology
    fill(brokers)
    assert run(brokers, "purge", "--reason", "not-msgpack", "--yes") == 0
    assert "purged 1 messages" in capsys.readouterr().out
    wait_depth(brokers, t.dead, DEPTH - 2)  # the message and its record
    assert sorted(str(r["reason"]) for r in listed(brokers, capsys)) == [
        "bad-join", "bad-signature", "delivery-limit"]
    wait_depth(brokers, t.dead, DEPTH - 2)

    assert run(brokers, "purge", "--party", "bob", "--yes") == 0
    wait_depth(brokers, t.dead, DEPTH - 4)
    assert run(brokers, "purge", "--reason", "no-such-reason", "--yes") == 0
    assert "nothing to purge" in capsys.readouterr().out
    wait_depth(brokers, t.dead, DEPTH - 4)
    left = drain(brokers, t.dead, DEPTH - 4)  # what is left: bad-join with its record, poison
    assert sorted(d.body for d in left if RECORD_HEADER not in d.headers) == [b"join?", POISON]

    fill(brokers)  # everything, records included
    assert run(brokers, "purge", "--yes") == 0
    wait_depth(brokers, t.dead, 0)


def test_replay_sends_the_original_bytes_back_to_their_queue(
        brokers: Brokers, capsys: pytest.CaptureFixture[str]) -> None:
    t = brokers.topology
    fill(brokers)
    assert run(brokers, "replay", "--reason", "not-msgpack", "--reason", "bad-join",
               "--yes") == 0
    out = capsys.readouterr().out
    assert f"1 to {t.updates}" in out and f"1 to {t.control}" in out
    wait_depth(brokers, t.dead, DEPTH - 4)
    [update] = drain(brokers, t.updates, 1)
    assert update.body == BODY
    assert update.headers == {"x-any": "thing", "n": 7, "nested": {"k": [1, b"\x00"]}}
    [join] = drain(brokers, t.control, 1)
    assert join.body == b"join?" and not any(k.startswith("x-") for k in join.headers)
    assert sorted(str(r["reason"]) for r in listed(brokers, capsys)) == [
        "bad-signature", "delivery-limit"]
    wait_depth(brokers, t.dead, DEPTH - 4)

    assert run(brokers, "replay", "--reason", "delivery-limit", "--yes") == 0
    wait_depth(brokers, t.dead, DEPTH - 5)
    [poison] = drain(brokers, t.updates, 1)
    assert poison.body == POISON
    assert not {"x-death", "x-delivery-count", "x-first-death-reason"} & set(poison.headers)


def test_replay_and_purge_refuse_without_yes_when_stdin_is_not_a_terminal(
        brokers: Brokers, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    t = brokers.topology
    fill(brokers)
    capsys.readouterr()
    for action in ("replay", "purge"):
        assert run(brokers, action, stdin="y\n", monkeypatch=monkeypatch) == 1
        err = capsys.readouterr().err
        assert f"dfl dead {action}: error: would {action} 4 messages" in err
        assert "--yes" in err and err.count("\n") == 1
        wait_depth(brokers, t.dead, DEPTH)
    assert brokers.open().queue_depth(t.updates) == 0


def test_on_a_terminal_it_asks_first(brokers: Brokers, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    t = brokers.topology
    fill(brokers)
    for answer, code, depth in (("n", 1, DEPTH), ("y", 0, DEPTH - 2)):
        controller, terminal = os.openpty()
        with os.fdopen(terminal, "r") as stdin:
            monkeypatch.setattr("sys.stdin", stdin)
            os.write(controller, f"{answer}\n".encode())
            capsys.readouterr()
            assert run(brokers, "purge", "--party", "bob") == code
            assert "purge 1 messages? [y/N]" in capsys.readouterr().out
        os.close(controller)
        wait_depth(brokers, t.dead, depth)


def test_list_keeps_the_order_of_the_queue(
        brokers: Brokers, capsys: pytest.CaptureFixture[str]) -> None:
    """More messages than a quorum queue returns in one small batch, all back in order."""
    t = brokers.topology
    b = brokers.open()
    t.declare(b)
    bodies = [f"m{i:03}".encode() for i in range(60)]
    for body in bodies:
        b.publish(t.ingress, t.updates, body)
    b.consume(t.updates, lambda d: b.nack(d, requeue=False), prefetch=100)
    pump(b, lambda: b.queue_depth(t.dead) == len(bodies))
    b.close()
    wait_depth(brokers, t.dead, len(bodies))
    keys = [hashlib.sha256(body).hexdigest() for body in bodies]
    for _ in range(3):
        rows = listed(brokers, capsys)
        assert [r["key"] for r in rows] == keys and {r["reason"] for r in rows} == {"rejected"}
        wait_depth(brokers, t.dead, len(bodies))


def test_errors_are_one_line_without_the_password(
        brokers: Brokers, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        run(brokers, "list")  # nothing declared: no F.dead
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert f"no queue {brokers.topology.dead!r}" in err
    password = urlparse(brokers.url).password
    assert password is None or f":{password}@" not in err
    with pytest.raises(SystemExit):
        run(brokers, "list", "--limit", "0")


def test_replay_drops_the_headers_pika_cannot_encode_and_says_so(
        brokers: Brokers, capsys: pytest.CaptureFixture[str]) -> None:
    if not brokers.url.startswith("memory://"):
        pytest.skip("RabbitMQ delivers nothing pika cannot encode again (3.10 turns floats "
                    "into ints); the unreadable-headers test (kept as its body alone) "
                    "covers what it can deliver")
    t = brokers.topology

    def tuple_header(b: Broker) -> tuple[int, dict[bytes, str]]:
        b.publish(t.ingress, t.updates, b"tuple", headers={"t": (1, 2), "ok": "yes"})
        return 1, {}

    fill(brokers, tuple_header)
    capsys.readouterr()
    assert run(brokers, "replay", "--reason", "delivery-limit", "--yes") == 0
    assert "without header(s) t (pika cannot encode them)" in capsys.readouterr().err
    got = drain(brokers, t.updates, 2)
    assert {d.body: d.headers for d in got}[b"tuple"] == {"ok": "yes"}


def test_replay_headers_keeps_what_pika_encodes() -> None:
    from decimal import Decimal

    headers = {"x-death": [{"reason": "rejected"}], "x-first-death-queue": "q",
               "x-last-death-reason": "r", "x-delivery-count": 3, "s": "text", "b": b"\xff",
               "i": -(2**63), "d": Decimal("1.25"), "when": datetime(2024, 1, 1),
               "nested": {"a": [None, True, {"deep": 1}]}, "f": 1.5, "tuple": (1,),
               "huge": 2**63, "nan": Decimal("NaN"), "before-1970": datetime(1960, 1, 1),
               "k" * 256: 1, "in-list": [1.0]}
    kept, dropped = dead.replay_headers(headers)
    assert set(kept) == {"s", "b", "i", "d", "when", "nested"}
    assert set(dropped) == {"f", "tuple", "huge", "nan", "before-1970", "k" * 256, "in-list"}


@pytest.mark.parametrize("broker_url", ["rabbitmq"], indirect=True)
def test_a_message_whose_headers_cannot_be_read_is_kept_as_its_body_alone(
        brokers: Brokers, capsys: pytest.CaptureFixture[str]) -> None:
    """RabbitMQ takes header tables pika cannot read (a timestamp past 2**63). Nobody can
    tell what such a table holds (a forged x-death would crash the broker's own
    dead-lettering), so the aggregator copies the body alone to F.dead: it is listed, and a
    replay sends the body back without the unreadable headers."""
    from tests import amqp_raw as raw

    t = brokers.topology
    url = urlparse(brokers.url)

    def publish_raw(_b: Broker) -> tuple[int, dict[bytes, str]]:
        with raw.RawPublisher().connect(url.hostname or "127.0.0.1", url.port or 5672,
                                        url.username or "guest", url.password or "guest",
                                        unquote(url.path[1:]) or "/") as pub:
            bad = raw.field_table([(b"ts", *raw.timestamp(2**63))])
            assert pub.publish(t.ingress, t.updates, b"unreadable", headers_raw=bad) == "ack"
        return 0, {b"unreadable": "bad-envelope"}

    fill(brokers, publish_raw)
    [row] = listed(brokers, capsys, "--reason", "bad-envelope")
    assert (row["queue"], row["size"]) == (t.updates, len(b"unreadable"))
    assert run(brokers, "replay", "--reason", "bad-envelope", "--yes") == 0
    b = brokers.open()
    wait_depth(brokers, t.updates, 1)
    replayed = b.get(t.updates)
    assert replayed is not None and replayed.body == b"unreadable"
    assert "ts" not in replayed.headers


@pytest.mark.parametrize("broker_url", ["rabbitmq"], indirect=True)
def test_dfl_dead_list_json_as_a_process(brokers: Brokers) -> None:
    t = brokers.topology
    fill(brokers)
    done = subprocess.run([dfl(), "dead", "list", "--json", "--broker", brokers.url,
                           "--federation", t.federation], capture_output=True, text=True,
                          timeout=120, env=ENV)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert sorted(r["reason"] for r in rows) == [
        "bad-join", "bad-signature", "delivery-limit", "not-msgpack"]
    wait_depth(brokers, t.dead, DEPTH)
