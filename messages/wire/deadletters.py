"""Dead letters: a refused message goes to ``F.dead`` byte for byte; its reason travels beside it.

Why not copy the message to ``F.dead`` with a reason header, as earlier versions did: a copy is
a re-publish of whatever the sender put in the envelope. Its header table may hold types a
client library cannot encode again (pika refuses floats, cannot represent some timestamps or
non-UTF-8 keys), and adding headers to a table the broker accepted can push the property frame
past ``frame_max``, which makes the broker close the connection: the daemon would then read a
hostile message as a broker outage and loop on it forever.

So a message is dead-lettered in two steps, both safe whatever it carries:

1. A *reason record* is published to ``F.dead``: a small msgpack body of our own (reason,
   detail, party, queue, time, the dead message's key), with one header of ours
   (``x-dfl-dead-record``). Nothing of the sender's envelope is in it, and its size is bounded
   (``MAX_DETAIL`` characters of detail), so it cannot fail on what the message carried. It is
   confirmed before step 2, so a crash in between leaves a redelivery (handled again, one more
   record), never a message without its reason.
2. The delivery is rejected without requeue (``basic.nack``): the broker moves the original
   message, properties and body unchanged, to the queue's dead-letter exchange (``F.dead``)
   and adds only its own ``x-death`` bookkeeping. Nothing is re-encoded by us.

One exception, found by fuzzing RabbitMQ 3.10 with raw frames: the broker's dead-lettering
itself reads one header of the message, ``x-death`` (it adds its own entry to the list). A
sender can forge an ``x-death`` whose entries are not tables, and dead-lettering such a message
crashes the source queue's process (``function_clause`` in ``rabbit_dead_letter``); after a few
restarts the queue stays down, so one message would take ``F.updates`` away from every party.
A message whose envelope carries ``x-death`` (no genuine party message does: ``dfl dead
replay`` strips it), or whose header table could not even be decoded (so nobody can tell), is
therefore *copied*: its body goes to ``F.dead`` with our headers only (``COPY_HEADER``), after
its record, and the original is acked. The sender's headers are not kept in that case; they
were hostile or unreadable.

A record finds its message by ``key``: ``chunk:<id>`` for the chunks of a chunked message
(every chunk of a set carries the set id), else the SHA-256 of the body. Messages the broker
dead-lettered on its own (the delivery limit: ``x-death`` reason ``delivery_limit``) have no
record; ``pair`` gives them the broker's reason. ``read_dead`` and ``dfl dead`` both pair
records with messages through ``pair``.

This module is pure: ``messages.transport.topology.dead_letter`` does the publishing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgpack

RECORD_HEADER = "x-dfl-dead-record"
"""Marks a reason record in ``F.dead`` (its value is the record format, 1)."""
COPY_HEADER = "x-dfl-dead-copy"
"""Marks a body copied to ``F.dead`` without its envelope (see the module docstring)."""
ENVELOPE_ERROR_HEADER = "x-dfl-envelope-error"
"""Put on a delivery by the transport when the broker's envelope could not be decoded."""
CHUNK_ID_HEADER = "x-dfl-chunk-id"  # the same name messages.wire.chunks gives the set id
MAX_DETAIL = 500
"""Characters of an error's detail kept in a record (the detail may quote the message)."""
MAX_FIELD = 128
"""Characters kept of the other text fields of a record (party ids are at most 64)."""
INTERNAL_ERROR = "internal-error"
"""The reason of a delivery whose handling raised an exception nobody expected."""
DELIVERY_LIMIT = "delivery-limit"
"""The reason of a message the broker dead-lettered after its delivery limit: it crashed or
stalled its consumer that many times."""


@dataclass(frozen=True, slots=True)
class Record:
    """Why one message was dead-lettered, as ``F.dead`` keeps it beside the message."""

    key: str
    reason: str
    detail: str
    party: str
    queue: str
    at: float
    """Unix time of the dead-lettering."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One message in ``F.dead`` with what is known of why it is there."""

    body: bytes
    headers: dict[str, Any]
    reason: str
    detail: str
    party: str
    queue: str
    at: float | None
    count: int
    """How many times the broker dead-lettered it (``x-death`` count; 1 for most)."""


def key_of(body: bytes, headers: Mapping[str, Any]) -> str:
    """The key that pairs a dead message with its record (see the module docstring)."""
    cid = headers.get(CHUNK_ID_HEADER)
    if isinstance(cid, bytes):
        cid = cid.decode("utf-8", "replace")
    if isinstance(cid, str) and 0 < len(cid) <= 64:
        return f"chunk:{cid}"
    return hashlib.sha256(body).hexdigest()


def _text(value: object, limit: int) -> str:
    """A printable, bounded rendering of ``value`` for a record (never raises)."""
    text = value if isinstance(value, str) else repr(value)
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def encode_record(record: Record) -> bytes:
    """The body of a reason record (plain msgpack, every field bounded)."""
    return bytes(msgpack.packb({
        "v": 1, "key": record.key[:80], "reason": _text(record.reason, 64),
        "detail": _text(record.detail, MAX_DETAIL), "party": _text(record.party, MAX_FIELD),
        "queue": _text(record.queue, MAX_FIELD), "at": float(record.at)}))


def decode_record(body: bytes) -> Record | None:
    """A record's contents; ``None`` when ``body`` is not one (anything can be in F.dead)."""
    try:
        raw = msgpack.unpackb(body, raw=False, max_str_len=4096, max_bin_len=0,
                              max_array_len=0, max_map_len=16)
    except Exception:  # msgpack raises many unrelated types for bodies that are not records
        return None
    if not isinstance(raw, dict) or raw.get("v") != 1:
        return None
    fields = ("key", "reason", "detail", "party", "queue")
    if not all(isinstance(raw.get(f), str) for f in fields) or not isinstance(
            raw.get("at"), (int, float)):
        return None
    return Record(raw["key"], raw["reason"], raw["detail"], raw["party"], raw["queue"],
                  float(raw["at"]))


def party_of(headers: Mapping[str, Any], fallback: str = "") -> str:
    """Who sent a message, as far as its envelope says (``x-dfl-signer``, chunk sender)."""
    for name in ("x-dfl-signer", "x-dfl-chunk-from"):
        value = headers.get(name)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, str) and value:
            return _text(value, MAX_FIELD)
    return fallback


def broker_may_dead_letter(headers: Mapping[Any, Any]) -> bool:
    """Whether the broker can dead-letter a message with these headers without harm: they
    were decoded, and they hold no ``x-death`` of the sender's (see the module docstring)."""
    return not any(k in headers for k in (ENVELOPE_ERROR_HEADER, "x-death", b"x-death"))


def broker_reason(headers: Mapping[str, Any]) -> tuple[str, str, int, float | None]:
    """What the broker's ``x-death`` says: (reason, queue, count, time) of the last death."""
    deaths = headers.get("x-death")
    if not isinstance(deaths, list) or not deaths or not isinstance(deaths[0], dict):
        return "unknown", "", 1, None
    last = deaths[0]
    reason = last.get("reason", "unknown")
    reason = reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)
    queue = last.get("queue", "")
    queue = queue.decode("utf-8", "replace") if isinstance(queue, bytes) else str(queue)
    count = last.get("count", 1)
    at = last.get("time")
    when = at.timestamp() if isinstance(at, datetime) else (
        float(at) if isinstance(at, int | float) else None)
    return (DELIVERY_LIMIT if reason == "delivery_limit" else reason), queue, (
        count if isinstance(count, int) else 1), when


def pair(record: Record | None, broker: tuple[str, str, int, float | None], party: str
         ) -> tuple[str, str, str, str, float | None]:
    """(reason, detail, party, queue, time) of a dead message: its record's, unless the broker
    dead-lettered it on its own at the delivery limit (a record of the same body is then about
    an earlier death); without a record, what the broker's ``x-death`` says (``broker``, from
    ``broker_reason``) and the ``party`` its envelope names."""
    reason, queue, _count, at = broker
    if record is not None and reason != DELIVERY_LIMIT:
        return record.reason, record.detail, record.party, record.queue, record.at
    return reason, "", party, queue, at


def read_dead(deliveries: Iterable[tuple[bytes, Mapping[str, Any]]]) -> list[DeadLetter]:
    """Pair the dead messages in ``deliveries`` (bodies and headers read from ``F.dead``,
    records included, in queue order) with their records. Records are not listed; a message
    with no record gets the broker's reason (``delivery-limit``, ``maxlen``, ...)."""
    items = list(deliveries)
    records: dict[str, Record] = {}
    for body, headers in items:
        if RECORD_HEADER in headers:
            record = decode_record(body)
            if record is not None:
                records[record.key] = record
    out = []
    for body, headers in items:
        if RECORD_HEADER in headers:
            continue
        broker = broker_reason(headers)
        why = pair(records.get(key_of(body, headers)), broker, party_of(headers))
        out.append(DeadLetter(body, dict(headers), *why, count=broker[2]))
    return out
