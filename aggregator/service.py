"""The aggregator daemon: wires strategies, membership, checkpoints and evaluation to a broker.

One thread owns the broker connection and runs every handler: decode and validate an
update, fold it into the global weights with the strategy, broadcast the new version. Acks
are deferred: a delivery is acked (``multiple=True``) only once a checkpoint that contains its
effect is on disk, so a crash at any moment loses nothing, and the ``(party, seq)`` check
drops what the broker redelivers after the restored state already holds it. The session is
supervised: when the broker goes away the service reconnects with backoff and carries on
from its in-memory state. Evaluation runs on its own thread (``aggregator.evaluation``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict
from pathlib import Path
from queue import SimpleQueue
from typing import Any

import numpy as np

from aggregator.boundary import guard, guarded_chunks
from aggregator.checkpoint import AggregatorState, CheckpointStore
from aggregator.config import AggregatorConfig
from aggregator.control import ControlProtocol
from aggregator.dedupe import KEEP, AppliedSeqs
from aggregator.distribution import ModelReplies, push_model
from aggregator.durability import Durability
from aggregator.evaluation import EvalRecord, Evaluator, load_keras_weights
from aggregator.keys import party_keys
from aggregator.membership import Membership, Party
from aggregator.metrics import AggregatorMetrics
from aggregator.outcomes import DeliveryEvent, Ending, Observers, UpdateStage
from aggregator.partials import DUPLICATE, all_held, check_partial, refusals
from aggregator.report import Status
from aggregator.secure import MaskCoordinator
from aggregator.staleness import make_staleness
from aggregator.strategies import (
    Contribution,
    Outcome,
    Strategy,
    make_optimizer,
    make_strategy,
)
from aggregator.strategies.fedbuff import FedBuff
from aggregator.strategies.secure import SecureFedBuff
from aggregator.validation import check_update
from messages.daemon.allocator import keep_large_buffers
from messages.daemon.plugins import build_model
from messages.errors import FederationError, InvalidMessage, StateError
from messages.secagg.sealing import SealedSeed
from messages.transport.broker import Broker, Delivery, mask_url
from messages.transport.chunked import ChunkedBroker
from messages.transport.connect import connect
from messages.transport.envelope import check_envelope
from messages.transport.supervisor import BackgroundService, Connected, supervise
from messages.transport.topology import Topology
from messages.types import NDArrays, Tensors, TensorSpec, spec_of
from messages.wire.chunks import model_size_bound
from messages.wire.codec import decode, encode
from messages.wire.kinds import Model, Partial, Stop, Taken, Update
from messages.wire.signing import (
    AGGREGATOR,
    SIGNATURE_HEADER,
    SIGNER_HEADER,
    KeyDirectory,
    Keyring,
    Signer,
    aggregator_keyring,
    check_signer,
    load_signer,
    signature_headers,
)

log = logging.getLogger("dfl.aggregator")

ROOT_KEEP = 256
"""A root's exact duplicate window per party: edges hold a party's updates for a while each,
so its seqs reach the root further out of order than one consumer's window returns them."""
CRASH_HOOK = "DFL_TEST_CRASH_PARTY"
"""Test-only fault injection: an aggregator started with this variable set exits at once
(``os._exit(70)``, as a crash would) when it reads an update of that party, so tests can show
that the broker's delivery limit ends a crash loop. Nothing sets it outside tests."""


class Aggregator(BackgroundService):
    """The aggregation service. ``run()`` blocks; ``start()`` runs it on a thread.

    >>> agg = Aggregator(AggregatorConfig(broker="memory://", target_accuracy=0.98)).start()
    >>> ... start parties ...
    >>> agg.wait(); agg.history[-1]["accuracy"]; model = agg.global_model()
    """

    thread_name = "aggregator"

    def __init__(self, config: AggregatorConfig) -> None:
        super().__init__()
        self.config = config
        self.topology = Topology(config.federation, config.queue_type,
                                 config.updates_max_length, config.delivery_limit)
        staleness = make_staleness(config.staleness, a=config.staleness_a, b=config.staleness_b)
        self.secure: MaskCoordinator | None = None
        """Secure aggregation's seam to the helper (``aggregator.secure``), when on."""
        optimizer = make_optimizer(config.server_optimizer, beta1=config.server_beta1,
                                   beta2=config.server_beta2, tau=config.server_tau)
        threshold = config.server_staleness_threshold
        if config.secure_aggregation:
            secure = SecureFedBuff(staleness, config.buffer_k, config.eta, config.secagg_clip,
                                   config.secagg_max_weight, optimizer=optimizer,
                                   staleness_threshold=threshold)
            self.strategy: Strategy = secure
            self.secure = MaskCoordinator(self, secure)
        else:
            self.strategy = make_strategy(config.strategy, staleness=staleness,
                                          alpha=config.mixing_alpha, k=config.buffer_k,
                                          eta=config.eta, aggregation=config.aggregation,
                                          trim_fraction=config.trim_fraction,
                                          max_update_norm=config.max_update_norm,
                                          optimizer=optimizer,
                                          staleness_threshold=threshold)
        self.membership = Membership(config.lease_seconds)
        self.observers = Observers()
        self.update_stages: list[UpdateStage] = []
        """Checks of a valid, fresh update before the strategy sees it (``UpdateStage``)."""
        self.observers.add(self._account)
        self.control = ControlProtocol(self)
        self._crash_party = os.environ.get(CRASH_HOOK)
        self._keyring: KeyDirectory | None = None
        self._signer: Signer | None = None
        if config.keys_dir:
            # Checked at construction: a daemon with a broken key directory must not start.
            self._keyring = party_keys(config.keys_dir)
            self._signer = load_signer(Path(config.keys_dir) / f"{AGGREGATOR}.key", AGGREGATOR)
        # a root takes partial sums only from edges, which sign with the aggregator's own key
        self._edges: Keyring | None = (
            aggregator_keyring(Path(config.keys_dir) / f"{AGGREGATOR}.pub")
            if config.keys_dir and config.role == "root" else None)
        self.names: list[str] = []
        self.weights: NDArrays = []
        self.spec: TensorSpec = ()
        # a returned window reorders at most a window's worth of one party's updates
        self.applied = AppliedSeqs(max(KEEP, 2 * config.prefetch,
                                       ROOT_KEEP if config.role == "root" else 0))
        """The (party, seq) the state holds: the duplicate check (``aggregator.dedupe``)."""
        self.incarnation: dict[str, int] = {}
        self.ledger: list[list[Any]] = []
        self.status = Status()
        self.store = CheckpointStore(config.checkpoint_dir) if config.checkpoint_dir else None
        self.evaluator = (Evaluator(config.model, config.data, config.data_dir, config.seed,
                                    config.eval_log, config.tensorboard)
                          if config.evaluate else None)
        self.metrics = AggregatorMetrics()
        self._stop = threading.Event()
        # start_training() from other threads, answered by the aggregator's thread in _tick
        self._start_requests: SimpleQueue[Future[dict[str, Any]]] = SimpleQueue()
        self._broker: ChunkedBroker | None = None
        self._started = 0.0
        self._applied_times: deque[float] = deque(maxlen=200)
        self._last_eval_version = -1
        self._last_eval_at = 0.0
        self._depth_at = 0.0
        self._stop_sent = False
        self._broadcast_due = False
        self._broadcast_at = 0.0  # the earliest time of the next coalesced broadcast
        self._probation: dict[str, str] = {}  # queue -> its consumer at prefetch 1 (_session)
        self._replies = ModelReplies()  # Query("model"): encoded and signed once a version
        self._generation = 0  # changes whenever the weights may have (the replies' key)
        self._pushing: bool | None = None  # how the last broadcast went (logged on change)
        # At most half the prefetch window: the deliveries of a batch stay unacked until its
        # checkpoint, and the other half keeps the broker sending meanwhile (a batch as large
        # as the window stalled the consumer at every checkpoint: benchmarks/throughput.py).
        self.durability = Durability(
            self.store, min(config.checkpoint_every_updates, max(1, config.prefetch // 2))
            if self.store else 1, self._snapshot)

    # -- public API ------------------------------------------------------------------------
    def stop(self, reason: str = "stopped") -> None:
        """Ask the service to finish (safe from any thread and from signal handlers).

        Unlike reaching a target or limit, this does not broadcast a stop: the parties keep
        waiting for an aggregator to come back (and resume from the checkpoint).
        """
        log.info("stopping: %s", reason)
        self._stop.set()

    def start_training(self, timeout: float = 10.0) -> dict[str, Any]:
        """Release model version 0 to the parties that joined so far (safe from any thread).

        The verb of ``--start manual`` (as IBM FL's ``start_training()``); with the default
        ``--start min-parties`` it releases early, before ``min_parties`` joined. Returns
        ``{"started": True, "version": 0, "parties": N}``; raises ``FederationError`` when no
        party has joined yet, training already started, or the aggregator is not running.
        """
        if self._stop.is_set():
            raise FederationError("the aggregator is not running: nothing to start")
        request: Future[dict[str, Any]] = Future()
        self._start_requests.put(request)  # the aggregator's thread answers it in _tick
        try:
            answer = request.result(timeout)
        except FutureTimeout:
            request.cancel()
            raise FederationError(f"the aggregator did not answer within {timeout:g} s "
                                  "(is it running and connected?)") from None
        if "error" in answer:
            raise FederationError(str(answer["error"]))
        return answer

    @property
    def version(self) -> int:
        return self.status.version

    @property
    def history(self) -> list[EvalRecord]:
        """The evaluation log so far (the same records as the JSONL file)."""
        return list(self.evaluator.history) if self.evaluator else []

    def global_model(self) -> Any:
        """The current global weights in a fresh Keras model built by the model plug-in."""
        return build_model(self.config.model, self.config.seed, [w.copy() for w in self.weights])

    # -- the service loop ------------------------------------------------------------------
    def run(self) -> Status:
        """Serve until the target, a limit, or ``stop()``; returns the final status."""
        keep_large_buffers()
        self._started = time.monotonic()
        state = self.store.load_latest() if self.store is not None else None
        if state is not None:
            self._restore(state)
        elif self.config.initial_model:
            self._adopt_initial(load_keras_weights(self.config.initial_model, self.config.model))
        if self.config.metrics_port is not None:
            self.metrics = AggregatorMetrics(self.config.metrics_port)
            log.info("metrics on http://0.0.0.0:%d/metrics (health: /livez, /readyz)",
                     self.metrics.port)
        self.metrics.stale_after = self.config.liveness_seconds
        if self.evaluator is not None:
            self.evaluator.start(resumed=state is not None)
        if self.secure is not None:
            self.secure.warn_without_checkpoints()
        try:
            supervise(self._session, stop=self._stop, name="aggregator",
                      alive=self.metrics.tick)
            if self.status.finished is not None and not self._stop_sent:
                self._stop_after_disconnect()
            self._final_outputs()
        finally:
            if self.evaluator is not None:
                self.evaluator.close()
            self.metrics.close()
        self._write_ledger()
        return self.status

    def _session(self, connected: Connected) -> None:
        cfg = self.config
        broker = self._broker = guarded_chunks(connect(cfg.broker), cfg,
                                               reject=self._dead_letter,
                                               notify=self.observers.notify)
        self.durability.session(broker)
        try:
            self.topology.declare(broker)
            # Probation: each consumer starts with a window of one delivery, and every delivery
            # is committed on its own, until one arrives that the broker had not delivered
            # before. After a crash the messages it left unacked come back first; handled one
            # at a time, a message that crashes us again is the only one whose delivery count
            # grows, so the broker's delivery limit ends a crash loop without ever counting an
            # innocent message out with it.
            # a root applies the edges' partial sums instead of the parties' updates
            inbox = ((self.topology.partials, self._handle_partial) if cfg.role == "root"
                     else (self.topology.updates, self._handle_update))
            if cfg.role == "root":
                self.topology.declare_partials(broker)
            self._probation = {
                queue: broker.consume(queue, self._guarded(handle), prefetch=1)
                for queue, handle in ((self.topology.control, self.control.handle), inbox)}
            if self.secure is not None:
                self.secure.session(broker)
            connected(mask_url(broker.url))
            self.metrics.set_ready(True)
            log.info("aggregator up: federation %s, %s/%s, version %d, %s", cfg.federation,
                     cfg.strategy, cfg.staleness, self.status.version,
                     "started" if self.status.released else
                     f"waiting for {cfg.min_parties} parties" if cfg.start == "min-parties"
                     else "waiting for a start request (dfl start)")
            # Parties that knew an earlier aggregator (a restart, a rollback to an older
            # checkpoint, no checkpoint at all) join again and take the model from the welcome.
            self.control.announce_rejoin()
            while not self._stop.is_set():
                due = self._broadcast_at - time.monotonic() if self._broadcast_due else 0.2
                broker.process_events(min(max(due, 0.0), 0.2))
                if self.secure is not None:
                    self.secure.pump(broker)
                self._flush_broadcast()
                self._tick()
            self._flush_broadcast(force=True)
            self._commit(force=True)
            self._broadcast_stop(broker)
        finally:
            self.metrics.set_ready(False, "stopped" if self._stop.is_set() else
                                   "not connected to the broker: reconnecting")
            self._broker = None
            self.durability.session(None)
            broker.close()

    def _guarded(self, handle: Any) -> Any:
        """``handle`` inside the delivery boundary (``aggregator.boundary``)."""
        boundary = guard(handle, reject=self._dead_letter, notify=self.observers.notify)

        def handler(d: Delivery) -> None:
            if self._stop.is_set():
                # Finishing: leave it unacked; it goes back to its queue when the connection
                # closes, for whoever serves the queue next. (Not nack-requeue: the broker
                # would hand it straight back, and every round trip counts towards the
                # delivery limit, so a stopping aggregator would dead-letter good updates.)
                # Nothing handled after it may be acked, so nothing more is handled.
                return
            event = boundary(d)
            if event.ending is not Ending.DEAD_LETTERED:
                # after the observers: a checkpoint holds their counts too
                self._handled(d, durable=event.durable)
            if d.queue in self._probation:
                self._commit()
                if not d.redelivered and self._broker is not None:
                    # a fresh delivery: the redelivered ones are behind us; open the window
                    self._broker.set_prefetch(self._probation.pop(d.queue),
                                              self.config.prefetch)

        return handler

    def _tick(self) -> None:
        self.metrics.tick()  # /livez: the loop goes round
        cfg = self.config
        while not self._start_requests.empty():
            request = self._start_requests.get()
            if request.set_running_or_notify_cancel():
                request.set_result(self._start_training())
        elapsed = time.monotonic() - self._started
        for party in self.membership.expire():
            log.warning("party %s: lease expired, no longer waited for", party)
            self._parties_changed()
        self.status.active_parties = len(self.membership.active)
        self.metrics.active_parties.set(self.status.active_parties)
        if self._broker is not None and time.monotonic() - self._depth_at > 5:
            self._depth_at = time.monotonic()
            self.metrics.queue_depth.set(self._broker.queue_depth(self.topology.updates))
            self.status.dead_letters = self._broker.queue_depth(self.topology.dead)
            self.metrics.dead_queue_depth.set(self.status.dead_letters)
        if self.durability.due(cfg.checkpoint_every_seconds):
            self._commit(force=True)
        self._drain_evaluations()
        if cfg.max_seconds is not None and elapsed >= cfg.max_seconds:
            self._finish_with(f"time limit {cfg.max_seconds:g} s")
        ev = self.evaluator
        if (ev is not None and ev.idle and self.status.version > self._last_eval_version
                and time.monotonic() - self._last_eval_at >= cfg.eval_every_seconds):
            self._submit_evaluation()

    def _finish_with(self, reason: str) -> None:
        if self.status.finished is None:
            self.status.finished = reason
            log.info("finishing: %s", reason)
        self._stop.set()

    def _broadcast_stop(self, broker: Broker) -> None:
        """When the federation is over, tell the parties so they exit too."""
        if self.status.finished is not None:
            self._to_parties(broker, encode(Stop(self.status.version, self.status.finished)))
            self._stop_sent = True

    def _stop_after_disconnect(self) -> None:
        """The connection dropped while finishing: one bounded try to still send the stop."""
        try:
            with connect(self.config.broker) as broker:
                self._broadcast_stop(broker)
        except FederationError as exc:
            log.error("could not broadcast the stop (%s): parties keep waiting", exc)

    def _final_outputs(self) -> None:
        """Per-party summary, the final evaluation and the saved model (off the broker)."""
        for p in self.membership.parties.values():
            log.info("party %s: %d updates applied, mean staleness %.2f, %s", p.party,
                     p.updates, p.mean_staleness, p.state)
        if not self.weights:
            return
        ev = self.evaluator
        if ev is not None and ev.error is None and self._last_eval_version < self.status.version:
            ev.wait_idle(600)
            self._submit_evaluation()
            ev.wait_idle(600)
            self._drain_evaluations()
        if self.config.save_model:
            self.global_model().save(self.config.save_model)
            log.info("saved global model version %d to %s", self.status.version,
                     self.config.save_model)

    # -- durability ------------------------------------------------------------------------
    def _handled(self, d: Delivery, *, durable: bool = True) -> None:
        """``d``'s effect is in the in-memory state: ack it with the next commit (a delivery
        that is not ``durable`` at once, when nothing waits for a checkpoint)."""
        if self.durability.handled(d, durable=durable):
            self._commit()

    def _commit(self, force: bool = False) -> None:
        """Checkpoint and ack what it covers (``aggregator.durability``); while secure
        aggregation waits for the helper, checkpoint but hold the acks (``MaskCoordinator``)."""
        held = self.secure is not None and self.secure.held()
        if self.durability.commit(force, hold_acks=held):
            self.status.checkpoints += 1

    def _snapshot(self) -> AggregatorState:
        s = self.status
        return AggregatorState(
            version=s.version, released=s.released, names=self.names, weights=self.weights,
            last_seq=self.applied.lasts(), seqs=self.applied.state(),
            incarnation=self.incarnation,
            strategy=self.strategy.state(),
            parties=[asdict(p) for p in self.membership.parties.values()],
            counters={"updates": s.updates, "duplicates": s.duplicates,
                      "discarded": s.discarded, "rejected": dict(s.rejected)},
            ledger=self.ledger)

    def _restore(self, state: AggregatorState) -> None:
        s = self.status
        s.version, s.released = state.version, state.released
        assert self.store is not None
        sent = self.store.broadcast_mark()
        if sent > state.version:
            # Versions up to ``sent`` went out with models this checkpoint does not hold: its
            # model continues under a version never used, so no party holds two models under
            # one number (parties rejoin and take it from their welcome).
            s.version = sent + 1
            log.warning("the checkpoint holds version %d but version %d was broadcast: "
                        "continuing as version %d", state.version, sent, s.version)
        self._generation += 1
        self.names, self.weights = state.names, state.weights
        self.spec = spec_of(dict(zip(self.names, self.weights, strict=True)))
        self.applied = AppliedSeqs.restore(state.seqs, state.last_seq, self.applied.keep)
        self.incarnation = state.incarnation
        if state.strategy:
            self.strategy.load_state(state.strategy)
        now = time.monotonic()  # every party gets a full lease to come back
        self.membership.parties = {p["party"]: Party(**{**p, "last_seen": now})
                                   for p in state.parties}
        c = state.counters
        s.updates, s.duplicates = c.get("updates", 0), c.get("duplicates", 0)
        s.discarded, s.rejected = c.get("discarded", 0), Counter(c.get("rejected", {}))
        self.ledger = state.ledger

    def _write_ledger(self) -> None:
        """With ``--ledger``: every (party, seq) applied, for exactly-once audits."""
        if self.config.ledger:
            s = self.status
            Path(self.config.ledger).write_text(json.dumps({
                "applied": self.ledger, "duplicates": s.duplicates, "discarded": s.discarded,
                "rejected": dict(s.rejected), "version": s.version}))

    # -- evaluation ------------------------------------------------------------------------
    def _submit_evaluation(self) -> None:
        assert self.evaluator is not None
        self._last_eval_version = self.status.version
        self._last_eval_at = time.monotonic()
        self.evaluator.submit(self.status.version, [w.copy() for w in self.weights],
                              self.status.updates, time.monotonic() - self._started)

    def _drain_evaluations(self) -> None:
        ev = self.evaluator
        if ev is None:
            return
        if ev.error is not None:
            raise FederationError(f"evaluation failed: {ev.error}") from ev.error
        while not ev.results.empty():
            record = ev.results.get()
            self.status.accuracy = record["accuracy"]
            self.metrics.accuracy.set(record["accuracy"])
            self.metrics.loss.set(record["loss"])
            log.info("version %d: accuracy %.4f loss %.4f (%d updates, %.1f s)",
                     record["version"], record["accuracy"], record["loss"], record["updates"],
                     record["time"])
            target = self.config.target_accuracy
            if target is not None and record["accuracy"] >= target:
                self._finish_with(f"target accuracy {target:g} reached "
                                  f"({record['accuracy']:.4f} at version {record['version']})")

    def _release(self) -> None:
        """Model version 0 to every party: training starts (once, kept in checkpoints)."""
        self.status.released = True
        self.status.version = 0
        self.strategy.parties_changed(self.weights, self.membership.active)
        log.info("%d parties joined: releasing model version 0", len(self.membership.active))
        self._broadcast()

    def _start_training(self) -> dict[str, Any]:
        """A start request (``start_training()`` or ``Query("start")``): release version 0
        now, or say why not. On the aggregator's thread."""
        if self.status.released:
            return {"error": f"training already started (now at version {self.status.version})"}
        if not self.membership.active or not self.weights:
            return {"error": "no party has joined yet: start the parties first"}
        self._release()
        self.durability.changed()  # released is on disk before anything else happens
        self._commit(force=True)
        return {"started": True, "version": self.status.version,
                "parties": len(self.membership.active)}

    def pushes_models(self) -> bool:
        """Whether models go to the parties themselves (broadcasts, welcomes) or only their
        versions, the parties fetching the model (``aggregator.distribution``)."""
        tensors = dict(zip(self.names, self.weights, strict=True))
        return push_model(model_size_bound(tensors), len(self.membership.active),
                          max_chunk_bytes=self.config.max_chunk_bytes,
                          push_max_parties=self.config.push_max_parties)

    def model_reply(self) -> tuple[bytes, dict[str, str] | None]:
        """The current model as ``Query("model")`` is answered: body and signature headers,
        made once per version (``aggregator.distribution``)."""

        def make() -> tuple[bytes, dict[str, str] | None]:
            body = encode(Model(self.status.version,
                                dict(zip(self.names, self.weights, strict=True))))
            return body, signature_headers(self._signer, body)

        return self._replies.body((self.status.version, self._generation), make)

    def _adopt_initial(self, tensors: Tensors) -> None:
        self._generation += 1
        self.names = list(tensors)
        self.weights = [np.array(a, dtype=a.dtype, copy=True) for a in tensors.values()]
        self.spec = spec_of(tensors)
        log.info("initial model: %d tensors, %d parameters", len(self.weights),
                 sum(w.size for w in self.weights))

    def _parties_changed(self) -> None:
        if self.status.released and self.strategy.parties_changed(
                self.weights, self.membership.active):
            self._new_version()

    # -- updates ---------------------------------------------------------------------------
    def _handle_update(self, d: Delivery) -> DeliveryEvent:
        """The stages of one update: envelope, signature, decode, validate (with dedupe), then
        the strategy, the only stage that changes state; every stage before it may refuse
        the message (``InvalidMessage``) and changes nothing."""
        assert self._broker is not None
        cfg = self.config
        began = time.perf_counter()
        check_envelope(d)
        signer = self._verified(d)
        # the finite check waits for validation, which makes it in one pass with the range
        message = decode(d.body, cfg.max_message_bytes, finite=False)
        if self._crash_party is not None and getattr(message, "party", None) == self._crash_party:
            os._exit(70)  # CRASH_HOOK: a test's stand-in for a bug that kills the process
        if signer is not None:
            check_signer(signer, str(getattr(message, "party", "")))
        try:
            update = check_update(message, parties=self.membership.parties, spec=self.spec,
                                  version=self.status.version, max_staleness=cfg.max_staleness,
                                  applied=self.applied, granted=self.incarnation,
                                  max_abs=cfg.max_delta_abs, masked=cfg.secure_aggregation)
        except InvalidMessage as exc:
            if exc.reason == "unknown-party" and isinstance(message, Update):
                self.control.ask_to_rejoin(message.party)
            raise
        if update is None:  # a replayed or redelivered (party, seq): already in the state
            assert isinstance(message, Update)
            return DeliveryEvent(Ending.DUPLICATE, d.queue, "update", message.party,
                                 message.seq)
        for stage in self.update_stages:  # may refuse it; none may change state
            stage(update)
        staleness = self.status.version - update.base_version
        try:
            sealed = (SealedSeed(update.seq, update.sealed_seed, update.seed_signature)
                      if update.sealed_seed else None)
            outcome = self.strategy.offer(self.weights, Contribution(
                update.party, list(update.tensors.values()), update.num_samples, staleness,
                sealed=sealed))
        except Exception as exc:
            # the strategy may have changed the weights half-way: they cannot be trusted
            raise StateError(f"the strategy failed applying {update.party}#{update.seq} "
                             f"({type(exc).__name__}: {exc}); stopping, a restart resumes "
                             "from the last checkpoint") from exc
        self.applied.add(update.party, update.seq)
        self.membership.seen(update.party)
        if outcome is not Outcome.DISCARDED:
            self.membership.record(update.party, staleness, update.base_version, update.metrics)
            self._applied_times.append(time.monotonic())
            if cfg.ledger:
                self.ledger.append([update.party, update.seq])
        if outcome is Outcome.APPLIED:
            self._new_version()
        self.metrics.apply_seconds.observe(time.perf_counter() - began)
        return DeliveryEvent(Ending.APPLIED, d.queue, "update", update.party, update.seq,
                             staleness, outcome=outcome.value)

    def _handle_partial(self, d: Delivery) -> DeliveryEvent:
        """A root's stages of an edge's partial sum (``aggregator.partials``): envelope, the
        edge's signature (the aggregator's own key, which edges hold), decode, the partial's
        form, then every member against the state. All new and valid: applied through
        FedBuff, checkpointed, then answered ``accepted``; else answered with the members it
        cannot take, nothing applied."""
        assert self._broker is not None
        cfg = self.config
        check_envelope(d)
        unsigned: InvalidMessage | None = None
        if self._edges is not None:
            try:
                self._edges.verify(d.body, d.headers)
            except InvalidMessage as exc:  # refused below, once it can be answered
                unsigned = exc
        partial = decode(d.body, cfg.max_message_bytes)
        if not isinstance(partial, Partial):
            raise InvalidMessage("wrong-queue", f"{partial.KIND} does not belong on partials")
        try:
            if unsigned is not None:
                raise unsigned
            check_partial(partial, self.spec)
        except InvalidMessage as exc:
            # Answered, so the edge dead-letters each member with the reason (our answers are
            # signed: a forger learns nothing from one). Unanswered, the edge would send the
            # same partial again and again.
            self._answer_partial(d, partial, [(i, exc.reason)
                                              for i in range(len(partial.parties))])
            raise
        version = self.status.version
        problems = refusals(partial, parties=self.membership.parties, granted=self.incarnation,
                            applied=self.applied, version=version,
                            max_staleness=cfg.max_staleness)
        if problems:
            for i, reason in problems:
                if reason == "unknown-party":
                    self.control.ask_to_rejoin(partial.parties[i])
                elif reason == DUPLICATE:
                    self.observers.notify(DeliveryEvent(Ending.DUPLICATE, d.queue, "update",
                                                        partial.parties[i], partial.seqs[i]))
            self._answer_partial(d, partial, problems)
            held = all_held(partial, problems)
            return DeliveryEvent(Ending.DUPLICATE if held else Ending.APPLIED, d.queue,
                                 "partial", partial.edge, partial.number,
                                 outcome="held" if held else "refused", durable=False)
        stale = [version - b for b in partial.bases]
        assert isinstance(self.strategy, FedBuff)  # --role root needs it (AggregatorConfig)
        try:
            outcome = self.strategy.offer_sum(self.weights, list(partial.tensors.values()),
                                              partial.weight, list(partial.parties), max(stale))
        except Exception as exc:
            raise StateError(f"the strategy failed applying partial {partial.number} of edge "
                             f"{partial.edge} ({type(exc).__name__}: {exc}); stopping, a "
                             "restart resumes from the last checkpoint") from exc
        now = time.monotonic()
        for party, seq, base, s in zip(partial.parties, partial.seqs, partial.bases, stale,
                                       strict=True):
            self.applied.add(party, seq)
            self.membership.seen(party)
            self.membership.record(party, s, base, {})
            self._applied_times.append(now)
            if cfg.ledger:
                self.ledger.append([party, seq])
            self.observers.notify(DeliveryEvent(Ending.APPLIED, d.queue, "update", party, seq,
                                                s, outcome=outcome.value))
        if outcome is Outcome.APPLIED:
            self._new_version()
        # the answer lets the edge ack the members' updates: only once a checkpoint holds them
        self._handled(d)
        self._commit(force=True)
        self._answer_partial(d, partial, [])
        return DeliveryEvent(Ending.APPLIED, d.queue, "partial", partial.edge, partial.number,
                             outcome=outcome.value)

    def _answer_partial(self, d: Delivery, partial: Partial,
                        problems: list[tuple[int, str]]) -> None:
        """``Taken``, naming each member of ``problems`` with its reason: accepted when there
        are none, or when the state already holds every member (all named ``duplicate``)."""
        assert self._broker is not None
        held = all_held(partial, problems)
        answer = encode(Taken(partial.number, not problems or held, self.status.version,
                              [partial.parties[i] for i, _r in problems],
                              [partial.seqs[i] for i, _r in problems],
                              [r for _i, r in problems]))
        self._broker.reply(d, answer, headers=signature_headers(self._signer, answer))

    def _account(self, event: DeliveryEvent) -> None:
        """The default observer: status counters, metrics and the log line of each outcome."""
        s, m = self.status, self.metrics
        if event.ending is Ending.DEAD_LETTERED:
            s.rejected[event.reason] += 1
            m.rejected.labels(event.reason).inc()
            if event.reason == "internal-error":
                m.internal_errors.inc()
            log.warning("dead-lettered a message from %s: %s: %s", event.queue, event.reason,
                        event.detail)
        elif event.ending is Ending.DUPLICATE and event.kind == "update" and event.seq is not None:
            s.duplicates += 1
            m.duplicates.inc()
            log.info("update %s#%d: a duplicate (already in the state), dropped", event.party,
                     event.seq)
        elif event.kind == "update" and event.staleness is not None:
            if event.outcome == Outcome.DISCARDED.value:
                s.discarded += 1
            else:
                s.updates += 1
                m.applied.inc()
                m.staleness.observe(event.staleness)
            m.party_lag.labels(event.party).set(event.staleness)
            log.info("update %s#%d staleness %d: %s, version %d", event.party, event.seq,
                     event.staleness, event.outcome, s.version,
                     extra={"party": event.party, "seq": event.seq,
                            "staleness": event.staleness, "version": s.version,
                            "outcome": event.outcome})

    # -- authenticity ----------------------------------------------------------------------
    def _to_parties(self, broker: Broker, body: bytes) -> None:
        """Every party's model queue: models, announcements, stop and rejoin requests."""
        broker.publish(self.topology.models, "", body,
                       headers=signature_headers(self._signer, body), persistent=False)

    def _verified(self, d: Delivery, *, query_ok: bool = False) -> str | None:
        """The signer of a delivery, checked before its body is even decoded.

        ``None`` when signing is off, or (``query_ok``) for an unsigned body small enough
        to be a read-only status/model query from an operator, which the caller checks
        once decoded. A signer the keyring does not know makes the key directory read
        again if it changed since (a party added later with ``dfl admin``).
        """
        if self._keyring is None:
            return None
        if (query_ok and SIGNER_HEADER not in d.headers and SIGNATURE_HEADER not in d.headers
                and len(d.body) <= 4096):
            return None
        return self._keyring.verify(d.body, d.headers)

    def _dead_letter(self, d: Delivery, reason: str, detail: str) -> None:
        """To ``F.dead`` byte for byte, its reason beside it (``messages.wire.deadletters``)."""
        assert self._broker is not None
        self.topology.dead_letter(self._broker, d, reason, detail)

    def _new_version(self) -> None:
        self._generation += 1
        self.durability.changed()
        self.status.version += 1
        self.metrics.version.set(self.status.version)
        window = list(self._applied_times)
        if len(window) >= 2 and window[-1] > window[0]:
            self.status.updates_per_second = (len(window) - 1) / (window[-1] - window[0])
        self._broadcast_due = True
        limit = self.config.max_versions
        if limit is not None and self.status.version >= limit:
            self._finish_with(f"version limit {limit}")

    def _flush_broadcast(self, *, force: bool = False) -> None:
        """Broadcast the newest version, at most once per ``--broadcast-interval``.

        A party only ever trains on the newest model, so when updates arrive faster than
        that (a backlog after a restart, many parties) the versions in between would be
        sent for nothing: 4.8 MB each for the built-in CNN, with a confirm wait, which cost
        three quarters of the aggregator's time in ``benchmarks/throughput.py``. An update
        after a quiet spell is still broadcast at once.
        """
        now = time.monotonic()
        if (self._broadcast_due and self._broker is not None
                and (force or now >= self._broadcast_at)):
            self._broadcast_due = False
            self._broadcast_at = now + self.config.broadcast_interval
            self._broadcast()

    def _broadcast(self) -> None:
        assert self._broker is not None
        push = self.pushes_models()
        if push != self._pushing:
            self._pushing = push
            log.info("%s", "pushing each new model to the parties" if push else
                     f"announcing new versions ({len(self.membership.active)} active parties, "
                     f"--push-max-parties {self.config.push_max_parties}, --max-chunk-bytes "
                     f"{self.config.max_chunk_bytes}): parties fetch the model when they "
                     "start a round")
        # announced: the version alone, parties fetch the model (aggregator.distribution)
        tensors = dict(zip(self.names, self.weights, strict=True)) if push else {}
        body = encode(Model(self.status.version, tensors))
        self.durability.mark_broadcast(self.status.version)
        self._to_parties(self._broker, body)
