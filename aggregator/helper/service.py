"""The helper daemon: answers the leader's mask requests, each set at most once.

One thread owns the broker connection. For each request on ``F.helper`` (a window of one, so
requests are answered in the order the leader sent them):

1. verify the leader's signature (when ``aggregator.pub`` is in ``--party-keys``), decode;
2. ``HelperRules.check``: set size, distinct parties, weights, never a ``(party, seq)`` twice;
3. for each entry, verify the party's signature over its sealed seed with the helper's own
   key list, and open the seed (HPKE, bound to that party and seq);
4. record the set as answered and save that to disk (fsync) **before** answering;
5. expand each seed (ChaCha20) and publish the weighted sum of the masks modulo 2^32 to
   ``F.sums``, signed with ``helper.key``; then ack the request.

A crash after step 4 redelivers the request; it is then a replay of an answered request (same
digest) and is answered again with the same sum, never with another set's. A refusal (steps
2-3) is answered too, so the leader can drop a buffer that will never be unmasked; refusals
are logged and counted by reason. A malformed request is dead-lettered like any bad message.
The helper never sees a masked delta: requests carry seeds, weights and ids only.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram

from aggregator.boundary import guard
from aggregator.helper.config import HelperConfig
from aggregator.helper.rules import HelperRules, Refusal
from aggregator.helper.store import HelperStore
from aggregator.outcomes import DeliveryEvent, Ending
from messages.daemon.metrics import MetricsEndpoint
from messages.errors import ConfigError, InvalidMessage
from messages.secagg import masks, sealing
from messages.transport.broker import Delivery, mask_url
from messages.transport.chunked import ChunkedBroker, chunked
from messages.transport.connect import connect
from messages.transport.envelope import check_envelope
from messages.transport.supervisor import BackgroundService, Connected, supervise
from messages.transport.topology import Topology
from messages.wire.codec import decode, encode
from messages.wire.kinds import MaskRequest, MaskSum
from messages.wire.signing import (
    AGGREGATOR,
    HELPER,
    Keyring,
    Signer,
    load_keyring,
    load_signer,
    signature_headers,
    verify_statement,
)

log = logging.getLogger("dfl.helper")
CRASH_HOOK = "DFL_TEST_HELPER_CRASH"
"""Test-only fault injection: a helper started with this variable set exits at once
(``os._exit(70)``, as a crash would) after it saved its first answered set and before it
answered, so tests can show that the redelivered request is answered as a replay. Nothing sets
it outside tests."""


class HelperMetrics(MetricsEndpoint):
    """The helper's instruments; ``port`` (0 = any free port) serves them over HTTP."""

    def __init__(self, port: int | None = None) -> None:
        super().__init__()
        r = self.registry
        self.answered = PromCounter("dfl_helper_answered", "Mask requests answered (new sets)",
                                    registry=r)
        self.replayed = PromCounter("dfl_helper_replayed", "Identical requests answered again",
                                    registry=r)
        self.refused = PromCounter("dfl_helper_refused", "Mask requests refused, by reason",
                                   ["reason"], registry=r)
        self.seconds = Histogram("dfl_helper_request_seconds", "CPU seconds of one answer",
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                                 registry=r)
        self.serve(port)


@dataclass
class HelperStats:
    """What the helper did since it started (``Helper.stats``)."""

    answered: int = 0
    replayed: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    updates: int = 0
    cpu_seconds: float = 0.0
    """CPU time of the helper's thread spent verifying, opening, expanding and summing."""


class Helper(BackgroundService):
    """The helper service. ``run()`` blocks; ``start()`` runs it on a thread."""

    thread_name = "helper"

    def __init__(self, config: HelperConfig) -> None:
        super().__init__()
        self.config = config
        if not config.seal_key:
            raise ConfigError("--seal-key FILE is required: the helper's X25519 private key "
                              "(helper-seal.key, made by `dfl admin add-helper`)")
        if not config.party_keys:
            raise ConfigError("--party-keys DIR is required: the helper's own copy of every "
                              "party's <id>.pub (it must not take them from the leader)")
        self._seal_key = sealing.load_seal_private(config.seal_key)
        self._ring: Keyring = load_keyring(config.party_keys, exclude=HELPER)
        self._keys_mtime = os.stat(config.party_keys).st_mtime_ns
        own = Path(config.party_keys) / f"{HELPER}.key"
        self._signer: Signer | None = load_signer(own, HELPER) if own.exists() else None
        self.topology = Topology(config.federation, config.queue_type, None,
                                 config.delivery_limit)
        self.rules = HelperRules(config.min_buffer, config.max_weight)
        self.store = HelperStore(config.state_dir)
        saved = self.store.load()
        if saved is not None:
            self.rules.load_state(saved)
            log.info("helper state: %d parties answered for, %d requests replayable",
                     len(self.rules.answered), len(self.rules.replays))
        self.stats = HelperStats()
        self.metrics = HelperMetrics()
        self._stop = threading.Event()
        self._broker: ChunkedBroker | None = None
        self._crash = bool(os.environ.get(CRASH_HOOK))

    def stop(self, reason: str = "stopped") -> None:
        """Ask the service to finish (safe from any thread and from signal handlers)."""
        log.info("stopping: %s", reason)
        self._stop.set()

    def run(self) -> HelperStats:
        """Serve until ``stop()``; returns what was done."""
        if self.config.metrics_port is not None:
            self.metrics = HelperMetrics(self.config.metrics_port)
        self.metrics.stale_after = self.config.liveness_seconds
        try:
            supervise(self._session, stop=self._stop, name="helper", alive=self.metrics.tick)
        finally:
            self.metrics.close()
        return self.stats

    def _session(self, connected: Connected) -> None:
        broker = self._broker = chunked(
            connect(self.config.broker), self.config,
            reject=lambda d, exc: self._account(self._dead(d, exc.reason, exc.detail)))
        try:
            self.topology.declare_helper(broker)
            boundary = guard(self._handle, reject=self._dead_letter, notify=self._account)

            def handle(d: Delivery) -> None:
                boundary(d)  # the event went to _account

            broker.consume(self.topology.helper_requests, handle, prefetch=1)
            connected(mask_url(broker.url))
            self.metrics.set_ready(True)
            log.info("helper up: federation %s, sets of at least %d parties, weights 1..%d",
                     self.config.federation, self.config.min_buffer, self.config.max_weight)
            while not self._stop.is_set():
                broker.process_events(0.2)
                self.metrics.tick()
        finally:
            self.metrics.set_ready(False, "not connected to the broker")
            self._broker = None
            broker.close()

    # -- one request -----------------------------------------------------------------------
    def _handle(self, d: Delivery) -> DeliveryEvent:
        assert self._broker is not None
        began = time.thread_time()
        check_envelope(d)
        if AGGREGATOR in self._ring.public:
            signer = self._ring.verify(d.body, d.headers)
            if signer != AGGREGATOR:
                raise InvalidMessage("impersonation", f"a mask request signed by {signer!r}, "
                                                      "not the leader")
        msg = decode(d.body, self.config.max_message_bytes)
        if not isinstance(msg, MaskRequest):
            raise InvalidMessage("wrong-queue", f"{msg.KIND} does not belong on "
                                                f"{self.topology.helper_requests}")
        try:
            replay = self.rules.check(msg)
            seeds = [self._seed(msg, i) for i in range(len(msg.parties))]
        except Refusal as refusal:
            self._answer(d, MaskSum(msg.request, False, refusal.detail[:500], {}))
            self.stats.refused[refusal.reason] += 1
            self.metrics.refused.labels(refusal.reason).inc()
            log.warning("refused request %d: %s: %s", msg.request, refusal.reason,
                        refusal.detail)
            return DeliveryEvent(Ending.APPLIED, d.queue, msg.KIND, outcome="refused",
                                 reason=refusal.reason)
        if not replay:
            self.rules.record(msg)
            self.store.save(self.rules.state())  # before the answer: never answer twice
            if self._crash:
                os._exit(70)  # CRASH_HOOK
        total = masks.mask_sum(seeds, msg.weights, msg.length)
        self._answer(d, MaskSum(msg.request, True, "", {"sum": total}))
        spent = time.thread_time() - began
        self.stats.cpu_seconds += spent
        self.stats.updates += len(seeds)
        self.metrics.seconds.observe(spent)
        if replay:
            self.stats.replayed += 1
            self.metrics.replayed.inc()
            log.info("answered request %d again (a replay of the same set)", msg.request)
        else:
            self.stats.answered += 1
            self.metrics.answered.inc()
            log.info("answered request %d: %d parties", msg.request, len(seeds))
        return DeliveryEvent(Ending.APPLIED, d.queue, msg.KIND,
                             outcome="replayed" if replay else "answered")

    def _seed(self, req: MaskRequest, i: int) -> bytes:
        """Entry ``i``'s seed, after checking its party's signature with the helper's own
        keys; ``Refusal`` (``unknown-seed``, ``bad-signature``) otherwise."""
        party, seq, sealed = req.parties[i], req.seqs[i], req.sealed[i]
        if party not in self._ring.public:
            self._reload_keys()
        try:
            verify_statement(self._ring, party, sealing.statement(
                self.config.federation, party, seq, sealed), req.signatures[i])
            return sealing.open_sealed(sealed, self._seal_key, self.config.federation, party,
                                       seq)
        except InvalidMessage as exc:
            reason = "unknown-seed" if exc.reason in ("unknown-signer", "unknown-seed") \
                else exc.reason
            raise Refusal(reason, f"{party}#{seq}: {exc.detail}") from None

    def _reload_keys(self) -> None:
        """Read ``--party-keys`` again if it changed since (a party added at run time)."""
        assert self.config.party_keys is not None
        try:
            mtime = os.stat(self.config.party_keys).st_mtime_ns
        except OSError:
            return
        if mtime == self._keys_mtime:
            return
        self._keys_mtime = mtime
        try:
            self._ring = load_keyring(self.config.party_keys, exclude=HELPER)
        except ConfigError as exc:  # a bad file added at run time: keep the old list
            log.error("party keys not re-read: %s", exc)

    def _answer(self, d: Delivery, answer: MaskSum) -> None:
        """Publish ``answer`` to ``F.sums`` (confirmed), then ack the request."""
        assert self._broker is not None
        body = encode(answer)
        self._broker.publish("", self.topology.helper_sums, body,
                             headers=signature_headers(self._signer, body), persistent=True)
        self._broker.ack(d)

    def _dead(self, d: Delivery, reason: str, detail: str) -> DeliveryEvent:
        self._dead_letter(d, reason, detail)
        return DeliveryEvent(Ending.DEAD_LETTERED, d.queue, reason=reason, detail=detail)

    def _dead_letter(self, d: Delivery, reason: str, detail: str) -> None:
        assert self._broker is not None
        self.topology.dead_letter(self._broker, d, reason, detail)

    def _account(self, event: DeliveryEvent) -> None:
        if event.ending is Ending.DEAD_LETTERED:
            self.stats.refused[event.reason] += 1
            self.metrics.refused.labels(event.reason).inc()
            log.warning("dead-lettered a message from %s: %s: %s", event.queue, event.reason,
                        event.detail)
