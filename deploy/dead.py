"""``dfl dead``: list, replay or purge the dead letters of a federation (``F.dead``).

``F.dead`` holds every rejected message byte for byte and, beside each, a reason record
(``messages.wire.deadletters``). This command reads the queue the one way that neither loses nor
reorders anything: a consumer with manual acks and a prefetch of the queue's depth at start
takes every message (records included) and acknowledges none, so closing the connection gives
them all back in their order. ``list`` stops there; ``replay`` and ``purge`` first ack the
messages they are done with (and the records of those messages), then close.

Bodies can be as big as a whole model (128 MiB), so only sizes and keys are kept, except the
bodies ``replay`` republishes: at most ``--limit`` of them per run. A message goes back the way
a party sends it: to the ingress exchange ``F.in`` with the queue it was dead-lettered from as
the routing key (only ``F.updates`` and ``F.control`` are replayed), with its own body and its
own headers less the broker's bookkeeping (``x-death``, ``x-first-death-*``,
``x-last-death-*``, ``x-delivery-count``), confirmed before it is acked from ``F.dead``. A crash
between the two replays it twice, which the aggregator's duplicate check absorbs.
"""

from __future__ import annotations

import argparse
import calendar
import decimal
import json
import select
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tabulate import tabulate

from deploy.remote import add_target_options
from messages.daemon.cli import Formatter, Parser, fail
from messages.errors import FederationError
from messages.transport.broker import Broker, Delivery, mask_url
from messages.transport.connect import connect
from messages.transport.topology import Topology, check_name
from messages.wire.deadletters import (
    DELIVERY_LIMIT,
    ENVELOPE_ERROR_HEADER,
    RECORD_HEADER,
    Record,
    broker_reason,
    decode_record,
    key_of,
    pair,
    party_of,
)

DESCRIPTION = """\
List, replay or purge the dead-lettered messages of a federation (the F.dead queue): every
message the aggregator refused, byte for byte, with the reason it was refused. list removes
nothing; replay sends matching messages back to the queue they came from (after the bug that
refused them is fixed); purge deletes them. Without --yes, replay and purge ask first.

examples:
  dfl dead list --broker amqp://guest:guest@rabbit:5672/%2F --federation mnist
  dfl dead list --json | jq 'group_by(.reason) | map({(.[0].reason): length}) | add'
  dfl dead replay --reason internal-error --yes
  dfl dead purge --party 3 --reason bad-signature
"""

MAX_PREFETCH = 65535
"""AMQP 0-9-1 carries a prefetch count in 16 bits: one run sees at most this many messages."""
ORPHAN_AGE = 60.0
"""Seconds after which a record with no message beside it is an orphan (its message was dropped
by F.dead's length bound); a younger one may still be waiting for its message."""
DETAIL_WIDTH = 48
"""Characters of a reason's detail shown in the table (``--json`` has all of it)."""
BROKER_HEADERS = ("x-death", "x-delivery-count")
BROKER_HEADER_PREFIXES = ("x-first-death-", "x-last-death-")
MAX_DEPTH = 64
"""Nesting of header tables and arrays a replay keeps (deeper values are dropped)."""


@dataclass(slots=True)
class Dead:
    """One dead message read from ``F.dead``: what ``list`` shows, what ``replay`` needs."""

    delivery: Delivery
    """Bodiless: only its tag matters (to ack it)."""
    key: str
    size: int
    reason: str
    detail: str
    party: str
    queue: str
    at: float | None
    count: int
    broker: tuple[str, str, int, float | None]
    """What the broker's ``x-death`` says (``broker_reason``)."""
    envelope_party: str
    """The party its envelope names (``party_of``)."""
    readable: bool = True
    """False when the transport could not read its header table (``ENVELOPE_ERROR_HEADER``):
    it cannot be sent again intact."""
    paired: bool = False
    """Whether its reason comes from a record (whose key is ``key``)."""
    body: bytes | None = None
    headers: dict[str, Any] | None = None
    correlation_id: str | None = None

    def row(self) -> dict[str, Any]:
        return {"time": iso(self.at), "reason": self.reason, "party": self.party,
                "queue": self.queue, "size": self.size, "count": self.count,
                "detail": self.detail, "key": self.key}


@dataclass(slots=True)
class Scan:
    """What one pass over ``F.dead`` saw (the deliveries are still unacked)."""

    depth: int
    dead: list[Dead] = field(default_factory=list)
    records: list[tuple[Delivery, Record | None]] = field(default_factory=list)

    @property
    def seen(self) -> int:
        return len(self.dead) + len(self.records)


@dataclass(frozen=True, slots=True)
class Filter:
    reasons: frozenset[str]
    parties: frozenset[str]

    @property
    def everything(self) -> bool:
        return not self.reasons and not self.parties

    def __call__(self, d: Dead) -> bool:
        return (not self.reasons or d.reason in self.reasons) and (
            not self.parties or d.party in self.parties)


def iso(at: float | None) -> str | None:
    """``at`` (Unix time) as ISO 8601 in UTC, to the second."""
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")


def _bare(d: Delivery) -> Delivery:
    """``d`` without its body and headers: enough to ack it, small enough to keep 100,000."""
    return Delivery(b"", d.tag, d.queue)


def _resolve(d: Dead, records: Mapping[str, Record]) -> None:
    """Give ``d`` its reason as ``messages.wire.deadletters.pair`` says (its record's, unless
    the broker dead-lettered it at its delivery limit)."""
    record = records.get(d.key)
    d.reason, d.detail, d.party, d.queue, d.at = pair(record, d.broker, d.envelope_party)
    d.paired = record is not None and d.broker[0] != DELIVERY_LIMIT


def scan(broker: Broker, topology: Topology, *, idle: float,
         keep: Callable[[Dead], bool] = lambda _d: False, limit: int = 0) -> Scan:
    """Take every message of ``F.dead`` (up to its depth now) without acking any.

    ``keep(d)`` says whether a message may be replayed (by what the records seen before it
    say); the bodies of the first ``limit`` such messages are kept. Stops when the depth seen
    at the start is reached or after ``idle`` seconds without a delivery.
    """
    depth = broker.queue_depth(topology.dead)
    result = Scan(depth)
    window = min(depth, MAX_PREFETCH)
    if window == 0:
        return result
    records: dict[str, Record] = {}
    kept = 0

    def on_delivery(delivery: Delivery) -> None:
        nonlocal kept
        if result.seen >= window:
            return  # arrived after the snapshot: left unacked, back to F.dead at the close
        headers = delivery.headers
        if RECORD_HEADER in headers:
            record = decode_record(delivery.body)
            result.records.append((_bare(delivery), record))
            if record is not None:
                records[record.key] = record
            return
        broker = broker_reason(headers)
        reason, queue, count, at = broker
        party = party_of(headers)
        d = Dead(_bare(delivery), key_of(delivery.body, headers), len(delivery.body), reason,
                 "", party, queue, at, count, broker, party, ENVELOPE_ERROR_HEADER not in headers)
        _resolve(d, records)
        if kept < limit and keep(d):
            d.body, d.headers, d.correlation_id = (delivery.body, dict(headers),
                                                   delivery.correlation_id)
            kept += 1
        result.dead.append(d)

    broker.consume(topology.dead, on_delivery, prefetch=window)
    last = time.monotonic()
    while result.seen < window:
        before = result.seen
        broker.process_events(0.2)
        if result.seen > before:
            last = time.monotonic()
        elif time.monotonic() - last > idle:
            break
    final = {r.key: r for _d, r in result.records if r is not None}
    for d in result.dead:
        _resolve(d, final)
    return result


# -- replay: headers pika can encode ---------------------------------------------------------

def _encodable(value: object, depth: int = 0) -> bool:
    """Whether pika (``pika.data.encode_value``) can encode ``value`` in a header table."""
    if depth > MAX_DEPTH:
        return False
    if value is None or isinstance(value, bytes | bool):
        return True
    if isinstance(value, str):
        return _utf8(value)
    if isinstance(value, int):
        return -(1 << 63) <= value < (1 << 63)  # pika sends every int as a signed 64-bit
    if isinstance(value, decimal.Decimal):
        return _decimal(value)
    if isinstance(value, datetime):
        try:
            return 0 <= calendar.timegm(value.utctimetuple()) < (1 << 64)
        except (OverflowError, ValueError):
            return False
    if isinstance(value, dict):
        return all(_key(k) and _encodable(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return all(_encodable(v, depth + 1) for v in value)
    return False  # floats, tuples, anything else: pika raises UnsupportedAMQPFieldException


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _key(key: object) -> bool:
    """A table key: a short string (at most 255 bytes of UTF-8) or bytes."""
    if isinstance(key, str):
        return _utf8(key) and len(key.encode("utf-8")) <= 255
    return isinstance(key, bytes) and len(key) <= 255


def _decimal(value: decimal.Decimal) -> bool:
    if not value.is_finite():
        return False
    value = value.normalize()
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    try:
        raw = int(value * decimal.Decimal(10) ** -exponent) if exponent < 0 else int(value)
    except (decimal.InvalidOperation, OverflowError):
        return False
    return -exponent <= 255 and -(1 << 31) <= raw < (1 << 31)


def replay_headers(headers: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The headers a replay sends: ``headers`` less the broker's dead-letter bookkeeping, and
    less any that pika cannot encode (their names are returned, to be reported)."""
    out: dict[str, Any] = {}
    dropped = []
    for name, value in headers.items():
        if isinstance(name, str) and (name in BROKER_HEADERS
                                      or name.startswith(BROKER_HEADER_PREFIXES)):
            continue
        if _key(name) and _encodable(value):
            out[name] = value
        else:
            dropped.append(name if isinstance(name, str) else repr(name))
    return out, dropped


# -- what a replay or purge acts on ----------------------------------------------------------

@dataclass(slots=True)
class Plan:
    act: list[Dead]
    left: Counter[str]
    """Matching messages left in F.dead this run, by why."""


def plan(result: Scan, match: Filter, limit: int,
         why_not: Callable[[Dead], str | None] = lambda _d: None) -> Plan:
    """The matching messages to act on: the first ``limit`` that ``why_not`` has nothing
    against, never part of a group sharing a key (a chunked message's chunks, which share one
    record), so that a chunk set is replayed whole and a record goes only with its last
    message."""
    matching = [d for d in result.dead if match(d)]
    left: Counter[str] = Counter()
    blocked: dict[str, str] = {}
    taken = 0
    for d in matching:
        problem = why_not(d) or (f"over --limit {limit}" if taken >= limit else None)
        if problem is None:
            taken += 1
        else:
            blocked.setdefault(d.key, problem)
    act = []
    for d in matching:
        if d.key in blocked:
            left[blocked[d.key]] += 1
        else:
            act.append(d)
    return Plan(act, left)


def settled_records(result: Scan, done: Iterable[Dead], everything: bool) -> list[Delivery]:
    """The records to ack once ``done`` are gone: those whose every message is among them,
    and, when purging ``everything``, orphans (unreadable, or older than ``ORPHAN_AGE`` with no
    message left)."""
    gone = {id(d) for d in done}
    remaining = {d.key for d in result.dead if d.paired and id(d) not in gone}
    done_keys = {d.key for d in result.dead if d.paired and id(d) in gone}
    present = {d.key for d in result.dead if d.paired}
    now = time.time()
    out = []
    for delivery, record in result.records:
        if record is None:
            if everything:
                out.append(delivery)
        elif record.key in remaining:
            continue
        elif record.key in done_keys or (everything and record.key not in present
                                         and now - record.at > ORPHAN_AGE):
            out.append(delivery)
    return out


# -- the command -----------------------------------------------------------------------------

def _parser(prog: str) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=DESCRIPTION, formatter_class=Formatter)
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (("list", "show the dead messages (removes nothing)"),
                       ("replay", "send matching dead messages back to their queue"),
                       ("purge", "delete matching dead messages")):
        p = sub.add_parser(name, help=text, description=text, formatter_class=Formatter)
        add_target_options(p)
        p.add_argument("--reason", action="append", default=[], metavar="R",
                       help="only messages dead-lettered for reason R (repeat for several)")
        p.add_argument("--party", action="append", default=[], metavar="P",
                       help="only messages from party P (repeat for several)")
        p.add_argument("--limit", type=int, default=1000, metavar="N",
                       help=("show at most N messages" if name == "list" else
                             f"{name} at most N messages per run") + " (default: 1000)")
        p.add_argument("--timeout", type=float, default=5.0, metavar="S",
                       help="stop reading F.dead after S seconds without a message (default: "
                            "5)")
        if name == "list":
            p.add_argument("--json", action="store_true", help="print a JSON list")
        else:
            p.add_argument("--yes", action="store_true",
                           help="do not ask for confirmation (needed when stdin is not a "
                                "terminal)")
    return parser


def _table(rows: Sequence[Dead], total: int, records: int, dead: str) -> str:
    if not total:
        return f"{dead} holds no dead messages" + (f" ({records} records)" if records else "")
    table = tabulate([[iso(d.at) or "-", d.reason, d.party or "-", d.queue or "-", d.size,
                       d.count, _cut(d.detail)] for d in rows],
                     headers=["time (UTC)", "reason", "party", "queue", "bytes", "deaths",
                              "detail"])
    more = f"; {total - len(rows)} more not shown (--limit)" if total > len(rows) else ""
    return f"{table}\n\n{total} dead messages in {dead}{more}"


def _cut(text: str) -> str:
    return text if len(text) <= DETAIL_WIDTH else text[:DETAIL_WIDTH - 3] + "..."


def _confirm(broker: Broker, question: str) -> bool:
    """Ask ``question`` on the terminal; the connection's heartbeats go on while it waits."""
    print(f"{question} [y/N] ", end="", flush=True)
    while not select.select([sys.stdin], [], [], 1.0)[0]:
        broker.process_events(0)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _refuse(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None, prog: str = "dfl dead") -> int:
    ns = _parser(prog).parse_args(argv)
    prog = f"{prog} {ns.action}"
    if ns.limit < 1:
        fail(prog, f"--limit {ns.limit}: must be at least 1")
    match = Filter(frozenset(ns.reason), frozenset(ns.party))
    try:
        topology = Topology(check_name("--federation", ns.federation))
        with connect(ns.broker) as broker:
            if not broker.exists(topology.dead):
                fail(prog, f"no queue {topology.dead!r} on {mask_url(ns.broker)}: is federation "
                           f"{ns.federation!r} declared (has its aggregator started)?")
            if ns.action == "list":
                return _list(ns, broker, topology, match)
            return _change(ns, prog, broker, topology, match)
    except FederationError as exc:
        fail(prog, str(exc).replace(ns.broker, mask_url(ns.broker)))


def _list(ns: argparse.Namespace, broker: Broker, topology: Topology, match: Filter) -> int:
    result = scan(broker, topology, idle=ns.timeout)
    matching = [d for d in result.dead if match(d)]
    rows = matching[:ns.limit]
    if ns.json:
        print(json.dumps([d.row() for d in rows], indent=2))
        if len(matching) > len(rows):
            print(f"{len(matching) - len(rows)} more not shown (--limit)", file=sys.stderr)
    else:
        print(_table(rows, len(matching), len(result.records), topology.dead))
    _note_window(result, topology)
    return 0  # closing the connection gives every message back to F.dead


def _note_window(result: Scan, topology: Topology) -> None:
    if result.seen < result.depth:
        print(f"note: read {result.seen} of the {result.depth} messages in {topology.dead} "
              "(at most 65535 per run, or the rest was taken meanwhile)", file=sys.stderr)


def _change(ns: argparse.Namespace, prog: str, broker: Broker, topology: Topology,
            match: Filter) -> int:
    replay = ns.action == "replay"
    queues = (topology.updates, topology.control)

    def why_not(d: Dead) -> str | None:
        if not replay:
            return None
        if d.queue not in queues:
            return f"from {d.queue or 'an unknown queue'}, not {' or '.join(queues)}"
        if not d.readable:
            return "a header table that cannot be read (so cannot be sent again intact)"
        return None

    def keep(d: Dead) -> bool:
        return replay and match(d) and why_not(d) is None

    def blocked(d: Dead) -> str | None:
        problem = why_not(d)
        if problem is None and replay and d.body is None:
            return f"over --limit {ns.limit}"
        return problem

    result = scan(broker, topology, idle=ns.timeout, keep=keep, limit=ns.limit)
    todo = plan(result, match, ns.limit, blocked)
    _note_window(result, topology)
    for why, n in todo.left.items():
        print(f"note: {n} matching messages stay in {topology.dead}: {why}", file=sys.stderr)
    n = len(todo.act)
    if n == 0:
        print(f"nothing to {ns.action}: no matching message in {topology.dead}")
        return 0
    if not ns.yes:
        if not sys.stdin.isatty():
            return _refuse(prog, f"would {ns.action} {n} messages; stdin is not a terminal, so "
                                 "confirm with --yes")
        if not _confirm(broker, f"{ns.action} {n} messages?"):
            return _refuse(prog, "nothing done")
    done: list[Dead] = []
    try:
        for d in todo.act:
            if replay:
                assert d.body is not None and d.headers is not None
                headers, dropped = replay_headers(d.headers)
                if dropped:
                    print(f"note: message {d.key[:16]} goes back without header(s) "
                          f"{', '.join(dropped)} (pika cannot encode them)", file=sys.stderr)
                broker.publish(topology.ingress, d.queue, d.body, headers=headers,
                               mandatory=True, correlation_id=d.correlation_id)
            broker.ack(d.delivery)
            done.append(d)
        for record in settled_records(result, done, match.everything and not replay):
            broker.ack(record)
    except FederationError as exc:
        verb = "replayed" if replay else "purged"
        fail(prog, f"{verb} {len(done)} of {n} messages, then: {exc} (the rest stay in "
                   f"{topology.dead})")
    if replay:
        where = Counter(d.queue for d in done)
        print(f"replayed {n} messages: " + ", ".join(f"{k} to {q}" for q, k in where.items()))
    else:
        print(f"purged {n} messages from {topology.dead}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
