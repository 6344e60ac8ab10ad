"""An edge aggregator (``dfl aggregator --role edge``): past one aggregator process.

Edges compete for ``F.updates`` (RabbitMQ spreads the deliveries). Each checks an update as
the aggregator does (envelope, signature, decode, tensor names and shapes, finite and range,
staleness against the newest root version it knows), keeps it unacked, and every
``--edge-k`` updates (or ``--edge-flush-seconds``) sends their weighted sum as one
``Partial`` to ``F.partials``, where the root (``--role root``) applies it as FedBuff applies
updates. An update is acked only once the root's answer says its state holds it; the
handshake and why it counts every update once are in ``aggregator.partials``.

One partial at a time waits for its answer (the next batch fills meanwhile); an answer not
received within ``--edge-answer-seconds`` makes the edge send the same partial again, each
try waiting twice as long, up to 10 minutes (the root answers a partial it already holds
with ``accepted``). After a (re)start the edge is on
probation as the aggregator is: a window of one delivery and partials of one update, until a
delivery arrives that the broker had not delivered before, so that a message that crashes the
edge is the only one whose delivery count grows.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggregator.boundary import dead_lettered, guard, guarded_chunks
from aggregator.config import AggregatorConfig
from aggregator.dedupe import AppliedSeqs
from aggregator.keys import party_keys
from aggregator.metrics import EdgeMetrics
from aggregator.outcomes import DeliveryEvent, Ending, Observers
from aggregator.partials import DUPLICATE, Member, build_partial
from aggregator.staleness import make_staleness
from aggregator.validation import check_update
from messages.daemon.allocator import keep_large_buffers
from messages.errors import (
    BrokerError,
    FederationError,
    InvalidMessage,
    PublishRejected,
    RpcTimeout,
)
from messages.transport.broker import Delivery, mask_url
from messages.transport.chunked import ChunkedBroker
from messages.transport.connect import connect
from messages.transport.envelope import check_envelope
from messages.transport.supervisor import BackgroundService, Connected, supervise
from messages.transport.topology import Topology
from messages.types import TensorSpec, spec_of
from messages.wire.codec import decode, encode
from messages.wire.kinds import Model, Query, Report, Stop, Taken, Update
from messages.wire.signing import (
    AGGREGATOR,
    KeyDirectory,
    Keyring,
    Signer,
    aggregator_keyring,
    check_signer,
    load_signer,
    signature_headers,
)

log = logging.getLogger("dfl.edge")
CRASH_HOOK = "DFL_TEST_EDGE_CRASH_ON_ANSWER"
"""Test-only fault injection: an edge started with this variable set to N exits at once
(``os._exit(70)``, as a kill -9 would) when the N-th accepted answer arrives, before it acks
a single update of that partial: the worst moment for counting twice. Nothing sets it
outside tests."""


_NONE_APPLIED = AppliedSeqs(1)
"""The duplicate check is the root's: to an edge no seq is applied yet (never added to)."""


class _Anyone:
    """Membership is the root's: an edge takes an update of any party id (the codec already
    bounded it), and the root refuses members of parties it does not know."""

    def __contains__(self, party: object) -> bool:
        return True


def default_edge_id() -> str:
    """``edge-<host>-<pid>``, reduced to the characters a queue name may hold."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", f"edge-{socket.gethostname()}-{os.getpid()}")
    return name[-64:]


@dataclass
class EdgeStatus:
    """What an edge has done so far (its log says the same per partial)."""

    taken: int = 0
    """Updates the root's state holds through this edge's partials (acked)."""
    duplicates: int = 0
    dead: Counter[str] = field(default_factory=Counter)
    partials: int = 0
    """Partials sent (a partial sent again counts once)."""
    resent: int = 0
    version: int = -1
    """The newest root version this edge knows."""
    finished: str | None = None


@dataclass
class _InFlight:
    number: int
    members: list[Member]
    correlation_id: str
    body: bytes
    headers: dict[str, str] | None
    deadline: float
    tries: int = 0


class Edge(BackgroundService):
    """One edge aggregator. ``run()`` blocks; ``start()`` runs it on a thread."""

    thread_name = "edge"

    def __init__(self, config: AggregatorConfig) -> None:
        super().__init__()
        if config.role != "edge":
            raise FederationError(f"an edge needs --role edge, not {config.role}")
        self.config = config
        self.edge_id = config.edge_id or default_edge_id()
        self.topology = Topology(config.federation, config.queue_type,
                                 config.updates_max_length, config.delivery_limit)
        self.staleness = make_staleness(config.staleness, a=config.staleness_a,
                                        b=config.staleness_b)
        self._keyring: KeyDirectory | None = None
        self._root: Keyring | None = None
        self._signer: Signer | None = None
        if config.keys_dir:
            # an edge is the root's operator's: it holds the aggregator's key, with which its
            # partials are signed and the root's answers and models are checked
            keys = Path(config.keys_dir)
            self._keyring = party_keys(config.keys_dir)
            self._signer = load_signer(keys / f"{AGGREGATOR}.key", AGGREGATOR)
            self._root = aggregator_keyring(keys / f"{AGGREGATOR}.pub")
        self.status = EdgeStatus()
        self.metrics = EdgeMetrics()
        self.observers = Observers()
        self.observers.add(self._account)
        self.names: list[str] = []
        self.spec: TensorSpec = ()
        self._stop = threading.Event()
        self._broker: ChunkedBroker | None = None
        self._open: list[Member] = []
        self._open_since = 0.0
        self._held: set[tuple[str, int]] = set()
        self._sent: _InFlight | None = None
        self._number = 0
        self._probation: str | None = None  # the updates consumer while at prefetch 1
        self._crash_on = int(os.environ.get(CRASH_HOOK, "0"))

    def stop(self, reason: str = "stopped") -> None:
        """Ask the edge to finish (safe from any thread and from signal handlers). The
        updates it holds go back to ``F.updates`` unacked, for the other edges."""
        log.info("edge %s stopping: %s", self.edge_id, reason)
        self._stop.set()

    def run(self) -> EdgeStatus:
        """Serve until the root broadcasts a stop, or ``stop()``; returns the final status."""
        keep_large_buffers()
        if self.config.metrics_port is not None:
            self.metrics = EdgeMetrics(self.config.metrics_port)
            log.info("metrics on http://0.0.0.0:%d/metrics (health: /livez, /readyz)",
                     self.metrics.port)
        self.metrics.stale_after = self.config.liveness_seconds
        try:
            supervise(self._session, stop=self._stop, name=f"edge {self.edge_id}",
                      alive=self.metrics.tick)
        finally:
            self.metrics.close()
        return self.status

    # -- the session -----------------------------------------------------------------------
    def _session(self, connected: Connected) -> None:
        cfg = self.config
        broker = self._broker = guarded_chunks(connect(cfg.broker), cfg,
                                               reject=self._dead_letter,
                                               notify=self.observers.notify)
        self._open, self._held, self._sent = [], set(), None
        try:
            self.topology.declare(broker)
            self.topology.declare_partials(broker)
            models = self.topology.declare_model_queue(broker, self.edge_id)
            broker.consume(models, self._on_model)
            connected(mask_url(broker.url))
            self._fetch_model(broker)
            if self._stop.is_set():
                return
            self._probation = broker.consume(
                self.topology.updates, self._guarded(self._handle_update), prefetch=1)
            self.metrics.set_ready(True)
            log.info("edge %s up: federation %s, root version %d, partials of %d updates",
                     self.edge_id, cfg.federation, self.status.version, cfg.edge_k)
            while not self._stop.is_set():
                broker.process_events(0.02)
                self._pump(broker)
                self.metrics.tick()
                self.metrics.root_version.set(self.status.version)
        finally:
            self.metrics.set_ready(False, "stopped" if self._stop.is_set() else
                                   "not connected to the broker: reconnecting")
            self._broker = None
            broker.close()

    def _fetch_model(self, broker: ChunkedBroker) -> None:
        """The model's tensor names and shapes and the root's version, asked of the root
        until it has a model (it takes the first one from a party's join)."""
        while not self._stop.is_set():
            try:
                reply = broker.call(self.topology.control, encode(Query("model")), timeout=30)
            except RpcTimeout:
                log.warning("edge %s: the root did not answer a model query; asking again",
                            self.edge_id)
                continue
            except InvalidMessage as exc:  # a chunked reply that did not reassemble
                log.warning("edge %s: the answer to a model query is unusable (%s); asking "
                            "again", self.edge_id, exc)
                continue
            try:
                self._verify_root(reply)
                msg = decode(reply.body, self.config.max_message_bytes)
            except InvalidMessage as exc:
                log.warning("edge %s: the answer to a model query is unusable (%s); asking "
                            "again", self.edge_id, exc)
                broker.process_events(1.0)
                continue
            if isinstance(msg, Model) and msg.tensors:
                self.names, self.spec = list(msg.tensors), spec_of(msg.tensors)
                self.status.version = max(self.status.version, msg.version)
                return
            if not isinstance(msg, Report):
                log.warning("edge %s: a %s answered a model query; asking again",
                            self.edge_id, msg.KIND)
            broker.process_events(1.0)  # no model yet: no party has joined

    def _on_model(self, d: Delivery) -> None:
        """The root's fanout: versions (to measure staleness against) and its stop. Anything
        else, or anything unsigned when keys are on, is ignored (the queue is our own and
        holds one message; nothing is dead-lettered from it)."""
        assert self._broker is not None
        self._broker.ack(d)
        try:
            self._verify_root(d)
            msg = decode(d.body, self.config.max_message_bytes)
        except InvalidMessage as exc:
            log.warning("edge %s: ignored a message on its model queue: %s", self.edge_id, exc)
            return
        if isinstance(msg, Model):
            self.status.version = max(self.status.version, msg.version)
        elif isinstance(msg, Stop):
            self.status.finished = msg.reason
            self.stop(f"the federation is over: {msg.reason}")

    def _verify_root(self, d: Delivery) -> None:
        if self._root is not None:
            self._root.verify(d.body, d.headers)

    # -- updates ---------------------------------------------------------------------------
    def _guarded(self, handle: Any) -> Any:
        boundary = guard(handle, reject=self._dead_letter, notify=self.observers.notify)

        def handler(d: Delivery) -> None:
            if self._stop.is_set():
                return  # unacked: back to the queue for another edge when we close
            event = boundary(d)
            if event.ending is Ending.DUPLICATE and self._broker is not None:
                self._broker.ack(d)
            if (self._probation is not None and not d.redelivered
                    and self._broker is not None):
                # a fresh delivery: the ones a crash left are behind us; open the window
                self._broker.set_prefetch(self._probation, self._window())
                self._probation = None

        return handler

    def _window(self) -> int:
        """The prefetch: a partial in flight and the next one filling."""
        return max(self.config.prefetch, 2 * self.config.edge_k)

    def _handle_update(self, d: Delivery) -> DeliveryEvent:
        """Check an update as the aggregator would and hold it for the next partial; every
        check before holding it may refuse it (``InvalidMessage``) and changes nothing."""
        cfg = self.config
        check_envelope(d)
        signer = None
        if self._keyring is not None:
            signer = self._keyring.verify(d.body, d.headers)
        message = decode(d.body, cfg.max_message_bytes, finite=False)
        if signer is not None:
            check_signer(signer, str(getattr(message, "party", "")))
        base = getattr(message, "base_version", 0)
        update = check_update(message, parties=_Anyone(), spec=self.spec,
                              version=max(self.status.version, base if isinstance(base, int)
                                          else 0),
                              max_staleness=cfg.max_staleness, applied=_NONE_APPLIED,
                              max_abs=cfg.max_delta_abs)
        assert isinstance(update, Update)
        key = (update.party, update.seq)
        if key in self._held:  # the same update twice in this edge's hands
            return DeliveryEvent(Ending.DUPLICATE, d.queue, "update", *key)
        if not self._open:
            self._open_since = time.monotonic()
        self._open.append(Member(update.party, update.seq, update.base_version,
                                 update.num_samples, list(update.tensors.values()), d))
        self._held.add(key)
        return DeliveryEvent(Ending.APPLIED, d.queue, "update", update.party, update.seq,
                             outcome="held")

    # -- partials --------------------------------------------------------------------------
    def _pump(self, broker: ChunkedBroker) -> None:
        """Settle an answered partial, send one again whose answer is late, or send the next
        batch when it is full or old enough."""
        sent = self._sent
        if sent is not None:
            try:
                reply = broker.next_reply(sent.correlation_id, 0.0, "")
            except RpcTimeout:
                reply = None
            if reply is not None:
                self._settle(broker, sent, reply)
            elif time.monotonic() >= sent.deadline:
                log.warning("edge %s: no answer to partial %d (try %d); sending it again",
                            self.edge_id, sent.number, sent.tries)
                self.status.resent += 1
                self.metrics.resent.inc()
                self._publish(broker, sent)
        if self._sent is not None or not self._open:
            return
        batch = 1 if self._probation is not None else self.config.edge_k
        if (len(self._open) >= batch
                or time.monotonic() - self._open_since >= self.config.edge_flush_seconds):
            members, self._open = self._open[:batch], self._open[batch:]
            self._open_since = time.monotonic()
            self._send(broker, members)

    def _send(self, broker: ChunkedBroker, members: list[Member]) -> None:
        number = self._number
        self._number += 1
        partial = build_partial(self.edge_id, number, max(self.status.version, 0), self.names,
                                members, self.staleness)
        body = encode(partial)
        sent = _InFlight(number, members, f"{self.edge_id}.{number}", body,
                         signature_headers(self._signer, body), 0.0)
        broker.expect_reply(sent.correlation_id)
        self._sent = sent
        self.status.partials += 1
        self.metrics.partials.inc()
        self._publish(broker, sent)

    def _publish(self, broker: ChunkedBroker, sent: _InFlight) -> None:
        """To ``F.partials``, persistent and confirmed: once this returns the broker holds it
        for the root, which answers on this connection's reply queue."""
        # each try waits twice as long for its answer, up to 10 min: a root that is down
        # finds few copies of one partial in its queue when it comes back
        wait = min(self.config.edge_answer_seconds * 2**sent.tries, 600.0)
        sent.tries += 1
        sent.deadline = time.monotonic() + wait
        try:
            broker.publish("", self.topology.partials, sent.body, headers=sent.headers,
                           mandatory=True, reply_to=broker.reply_address(),
                           correlation_id=sent.correlation_id)
        except PublishRejected as exc:  # not stored: tried again when its wait is over
            log.warning("edge %s: the broker refused partial %d (%s); trying again in %g s",
                        self.edge_id, sent.number, exc, wait)

    def _settle(self, broker: ChunkedBroker, sent: _InFlight, reply: Delivery) -> None:
        """The root answered: ack what its state holds, settle what it named, send the rest
        again. An answer that cannot be read is ignored (the partial goes again when late)."""
        try:
            self._verify_root(reply)
            answer = decode(reply.body, self.config.max_message_bytes)
            if not isinstance(answer, Taken) or answer.number != sent.number:
                raise InvalidMessage("wrong-kind", "not the answer to this partial")
        except InvalidMessage as exc:
            log.warning("edge %s: ignored an answer to partial %d: %s", self.edge_id,
                        sent.number, exc)
            return
        if answer.accepted and self._crash_on:
            self._crash_on -= 1
            if not self._crash_on:
                os._exit(70)  # CRASH_HOOK: the root holds the members, none is acked yet
        broker.forget_reply(sent.correlation_id)
        self._sent = None
        self.status.version = max(self.status.version, answer.version)
        named = {(p, s): r for p, s, r in zip(answer.parties, answer.seqs, answer.reasons,
                                                strict=False)}
        if not answer.accepted and not named:
            named = {(m.party, m.seq): "partial-refused" for m in sent.members}
        again: list[Member] = []
        for m in sent.members:
            key = (m.party, m.seq)
            reason = named.get(key)
            if answer.accepted and reason is None:
                broker.ack(m.delivery)
                self.observers.notify(DeliveryEvent(
                    Ending.APPLIED, self.topology.updates, "update", m.party, m.seq,
                    outcome="taken"))
            elif reason == DUPLICATE:
                broker.ack(m.delivery)
                self.observers.notify(DeliveryEvent(Ending.DUPLICATE, self.topology.updates,
                                                    "update", m.party, m.seq))
            elif reason is not None and not answer.accepted:
                detail = f"the root refused {m.party}#{m.seq} of partial {sent.number}"
                self.observers.notify(dead_lettered(m.delivery, reason, detail,
                                                    self._dead_letter))
            elif not answer.accepted:
                again.append(m)
                continue
            else:  # accepted, but a reason other than duplicate: the root's bug, not ours
                broker.ack(m.delivery)
                log.error("edge %s: partial %d accepted with %s#%d named %r", self.edge_id,
                          sent.number, m.party, m.seq, reason)
            self._held.discard(key)
        log.info("edge %s: partial %d of %d updates %s (root version %d)", self.edge_id,
                 sent.number, len(sent.members),
                 "taken" if answer.accepted else f"refused for {len(named)}, "
                 f"{len(again)} sent again", answer.version)
        if again:
            self._open = again + self._open
            self._open_since = 0.0  # send them at once

    def _account(self, event: DeliveryEvent) -> None:
        s, m = self.status, self.metrics
        if event.ending is Ending.DEAD_LETTERED:
            s.dead[event.reason] += 1
            m.rejected.labels(event.reason).inc()
            log.warning("edge %s: dead-lettered a message from %s: %s: %s", self.edge_id,
                        event.queue, event.reason, event.detail)
        elif event.ending is Ending.DUPLICATE:
            s.duplicates += 1
            m.duplicates.inc()
        elif event.outcome == "taken":
            s.taken += 1
            m.taken.inc()

    def _dead_letter(self, d: Delivery, reason: str, detail: str) -> None:
        broker = self._broker
        if broker is None:
            raise BrokerError("not connected: the delivery goes back to its queue")
        self.topology.dead_letter(broker, d, reason, detail)
