"""The party daemon: join, train on the newest global model, publish the delta, repeat.

The thread that calls ``run`` owns the broker connection and keeps servicing it (heartbeats,
incoming models) while Keras trains on a separate single-thread executor: a long ``fit`` never
starves AMQP heartbeats, and Keras objects never leave the training thread.

What survives a lost connection lives on the object, not in the session: the training in
progress, and the encoded update waiting for the broker's confirm. The supervisor reconnects,
the party joins again (which also hands it a fresh ``seq`` range), and the pending update is
published until the broker confirms it. A full queue (``reject-publish``) is met the same
way: back off, keep servicing the connection, retry.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata

from tenacity import Retrying, retry_if_exception_type, wait_exponential

from messages.daemon.allocator import keep_large_buffers
from messages.daemon.plugins import check_data_plugin
from messages.errors import (
    ConnectionLost,
    FederationError,
    InvalidMessage,
    PublishRejected,
    ResourceLocked,
    RpcTimeout,
)
from messages.transport.broker import Broker, Delivery, mask_url
from messages.transport.chunked import chunked
from messages.transport.connect import connect
from messages.transport.envelope import check_envelope
from messages.transport.supervisor import BackgroundService, Connected, supervise
from messages.transport.topology import Topology
from messages.types import NDArrays, Settings
from messages.wire.codec import SCHEMA_VERSION, decode, encode
from messages.wire.kinds import Heartbeat, Join, Leave, Message, Model, Query, Stop, Update, Welcome
from messages.wire.signing import (
    Keyring,
    Signer,
    aggregator_keyring,
    load_signer,
    signature_headers,
)
from worker.config import WorkerConfig
from worker.metrics import WorkerMetrics
from worker.pipeline import DeltaStage, Outgoing, PrivacyStage, stages_for
from worker.trainers import (
    StopTraining,
    Trainer,
    TrainerFactory,
    TrainResult,
    build_trainer,
)

log = logging.getLogger("dfl.worker")
SOFTWARE = f"dfl/{metadata.version('deep-federated-learning')} schema/{SCHEMA_VERSION}"
"""What a party declares in its join: the framework release and the wire schema."""


@dataclass(slots=True)
class WorkerStats:
    """What a worker did, for tests, logs and notebooks."""

    updates_sent: int = 0
    last_seq: int = -1
    model_version: int = -1
    rejected_publishes: int = 0
    stopped_by: str = ""
    epsilon: float = 0.0  # privacy spent so far, with --dp-clip/--dp-noise
    update_bytes: int = 0  # encoded bodies of the updates sent, in all (see --encoding)


class Worker(BackgroundService):
    """One party. ``run()`` blocks until stopped; ``start()`` runs it on a thread."""

    def __init__(self, config: WorkerConfig, *, trainer_factory: TrainerFactory = build_trainer,
                 delta_stages: list[DeltaStage] | None = None) -> None:
        """``trainer_factory(config, party_id)`` builds the local trainer
        (``worker.trainers``); ``delta_stages`` replaces the delta pipeline the settings ask
        for (``worker.pipeline``)."""
        super().__init__()
        self.thread_name = f"party-{config.party}"
        self.config = config
        self.topology = Topology(config.federation, config.queue_type,
                                 config.updates_max_length)
        self.stats = WorkerStats()
        self.metrics = WorkerMetrics()
        self._stop = threading.Event()
        self._latest: Model | None = None
        self._trainer: Trainer | None = None
        self._trainer_factory = trainer_factory
        self._pool: ThreadPoolExecutor | None = None
        self._training: tuple[int, Future[TrainResult]] | None = None  # base version, job
        self._pending: tuple[int, bytes] | None = None  # seq, encoded update to confirm
        self._next_seq = 0
        self._last_base = -1
        self._claimed = False
        self._rejoin = False
        self._announced: int | None = None  # a model version too big for the model queue
        self._next_beat = 0.0
        self._settings: Settings = {}
        # The data plug-in's signature and the key files are checked here, so that a bad
        # plug-in or path stops the daemon before it connects.
        check_data_plugin(config.data)
        self._signer: Signer | None = (load_signer(config.signing_key, config.party)
                                       if config.signing_key else None)
        self._trust: Keyring | None = (aggregator_keyring(config.aggregator_key)
                                       if config.aggregator_key else None)
        # privacy, then compression (which must see privatised deltas only), then whatever
        # a caller adds: the settings are checked here, before anything connects
        self.delta_stages = stages_for(config) if delta_stages is None else delta_stages
        self._privacy = next((s.privacy for s in self.delta_stages
                              if isinstance(s, PrivacyStage)), None)

    # -- public API ------------------------------------------------------------------------
    def stop(self, reason: str = "stopped") -> None:
        """Stop after the current minibatch, send leave, close (safe from any thread)."""
        if not self.stats.stopped_by:
            self.stats.stopped_by = reason
        self._stop.set()
        if self._trainer is not None:
            self._trainer.interrupted.set()

    # -- the daemon loop -------------------------------------------------------------------
    def run(self) -> WorkerStats:
        keep_large_buffers()
        cfg = self.config
        if cfg.metrics_port is not None:
            self.metrics = WorkerMetrics(cfg.metrics_port)
        self.metrics.stale_after = cfg.liveness_seconds
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="train") as pool:
                self._pool = pool
                try:
                    supervise(self._session, stop=self._stop, name=f"party {cfg.party}",
                              alive=self.metrics.tick)
                finally:  # do not sit out a training round on the way out
                    if self._trainer is not None:
                        self._trainer.interrupted.set()
        finally:
            self.metrics.close()
        if self._pending is not None:
            log.warning("party %s: update %d was not confirmed before stopping; it is dropped",
                        self.config.party, self._pending[0])
        log.info("party %s done: %d updates sent (%s)", self.config.party,
                 self.stats.updates_sent, self.stats.stopped_by)
        return self.stats

    def _session(self, connected: Connected) -> None:
        cfg = self.config
        broker = connect(cfg.broker)
        try:
            if not self._await_federation(broker):
                return
            queue = self._claim(broker)
            # big updates and joins go out in chunks; big welcomes and models come in chunks
            broker = chunked(broker, self.config, sender=self.config.party)
            if self._trainer is None:
                self._trainer = self._serviced(broker, self._trainer_factory, self.config,
                                               self.config.party_id)
                if self._stop.is_set():
                    self._trainer.interrupted.set()
            broker.consume(queue, self._on_model, auto_ack=True)
            connected(mask_url(broker.url))
            self.metrics.set_ready(True)
            if self._join(broker) is None:
                return
            self._loop(broker)
            if not self.stats.stopped_by.startswith("aggregator"):
                self._send(broker, self.topology.control,
                           encode(Leave(self.config.party, self.stats.stopped_by)))
        finally:
            self.metrics.set_ready(False, "stopped" if self._stop.is_set() else
                                   "not connected to the broker: reconnecting")
            broker.close()

    def _await_federation(self, broker: Broker) -> bool:
        """Wait until the aggregator has declared the federation (parties never declare it);
        False when stopped first."""
        if self.topology.ready(broker):
            return True
        log.info("party %s: federation %r is not on the broker yet; waiting for its "
                 "aggregator", self.config.party, self.config.federation)
        self.metrics.set_ready(False, f"federation {self.config.federation!r} is not on the "
                                      "broker yet: waiting for its aggregator")
        while not self._stop.is_set():
            self.metrics.tick()
            broker.process_events(0.5)
            if self.topology.ready(broker):
                return True
        return False

    def _claim(self, broker: Broker) -> str:
        """Declare this party's exclusive model queue; with ``auto``, the first free id.

        The queue is exclusive to this connection, so it doubles as a lock on the party id:
        a second process with the same id is refused instead of corrupting the federation.
        """
        cfg = self.config
        ids = range(cfg.num_parties) if cfg.party_id == "auto" else [int(cfg.party_id)]
        for party_id in ids:
            try:
                queue = self.topology.declare_model_queue(broker, str(party_id))
            except ResourceLocked:
                if self._claimed:  # our previous connection, not yet reaped by the broker
                    raise ConnectionLost(f"party {party_id}'s queue is still held by the "
                                         "previous connection") from None
                continue
            self._claimed = True
            if cfg.party_id == "auto":
                log.info("claimed party id %d of %d", party_id, cfg.num_parties)
                self.config = cfg.model_copy(update={"party_id": party_id})
            return queue
        if cfg.party_id == "auto":
            raise FederationError(f"all {cfg.num_parties} party ids are taken by running "
                                  "parties; raise --num-parties or stop one")
        raise FederationError(f"party {cfg.party_id} is already active from another "
                              "connection; give this one another --party-id")

    def _serviced(self, broker: Broker, fn: Callable[..., Trainer], *args: object
                  ) -> Trainer:
        """Run ``fn`` on the training thread while this thread keeps the connection alive."""
        assert self._pool is not None
        job = self._pool.submit(fn, *args)
        while not job.done():
            self.metrics.tick()
            broker.process_events(0.1)
        return job.result()

    def _join(self, broker: Broker) -> Welcome | None:
        cfg = self.config
        assert self._trainer is not None
        join = encode(Join(cfg.party, len(self._trainer.y), self._trainer.initial(),
                           software=SOFTWARE))
        if len(join) > cfg.max_message_bytes:  # the aggregator would dead-letter every update
            raise FederationError(f"the model's messages are {len(join)} bytes, over "
                                  f"--max-message-bytes {cfg.max_message_bytes}: raise it on "
                                  "every process of the federation")
        # Broadcasts delivered while the join is in flight are newer than anything seen
        # before it: keep them apart from the older models (a restarted aggregator may have
        # rolled back) so a welcome sent before a broadcast cannot hide that broadcast.
        self._latest = self._announced = None
        while not self._stop.is_set():
            self.metrics.tick()
            try:
                reply = self._ask(broker, join, "welcome")
            except RpcTimeout:
                log.info("party %s: no answer from the aggregator yet, asking again", cfg.party)
                continue
            if not isinstance(reply, Welcome):
                raise FederationError(f"join answered with a {reply.KIND} message")
            if not reply.accepted:
                raise FederationError(f"the aggregator refused party {cfg.party}: "
                                      f"{reply.reason}")
            self._next_seq = reply.next_seq
            self._settings = dict(reply.settings)
            if self._settings.get("secure_aggregation") and self.config.helper_key is None:
                raise FederationError("this federation uses secure aggregation: pass "
                                      "--helper-key FILE (the helper's helper-seal.pem) and "
                                      "--signing-key")
            if self.config.helper_key and not self._settings.get("secure_aggregation"):
                raise FederationError("this party has --helper-key but the aggregator does not "
                                      "run secure aggregation: it would see every delta in "
                                      "the clear; start it with --secure-aggregation")
            # The welcome is the truth, even when older than a model seen before the join: a
            # restarted aggregator may have resumed from an earlier checkpoint. Only a model
            # broadcast after the welcome was sent (and delivered before it) is newer.
            during = self._latest
            self._latest = Model(reply.version, reply.tensors) if reply.tensors else None
            if during is not None and (self._latest is None
                                       or during.version > self._latest.version):
                self._latest = during
            self._last_base = -1
            if self._latest is None and reply.version >= 0 and not reply.tensors:
                # welcomed without the model (many parties: aggregator.distribution): fetch it
                self._announced = max(self._announced or -1, reply.version)
            if self._latest is not None:
                log.info("party %s joined at model version %d", cfg.party,
                         self._latest.version)
            else:
                log.info("party %s joined; waiting for the first model", cfg.party)
            return reply
        return None

    def _loop(self, broker: Broker) -> None:
        assert self._trainer is not None and self._pool is not None
        trainer = self._trainer
        self._next_beat = time.monotonic()
        while not self._stop.is_set():
            self.metrics.tick()  # /livez: the loop goes round
            s = self._settings
            if self._rejoin and self._training is None:
                self._rejoin = False
                log.info("party %s: the aggregator asks parties to join again", self.config.party)
                if self._join(broker) is None:
                    return
                continue
            if self._pending is not None:
                self._publish_pending(broker)
                continue
            if self._training is not None:
                base_version, job = self._training
                while not job.done():
                    broker.process_events(0.1)
                    self._heartbeat(broker)
                self._training = None
                try:
                    result = job.result()
                except StopTraining as exc:  # e.g. DP-SGD's --target-epsilon reached
                    self.stop(str(exc))
                    break
                if result is None:  # interrupted by stop
                    break
                delta, metrics = result
                self.metrics.train_seconds.observe(metrics["train_seconds"])
                out = Outgoing(dict(zip(trainer.names, delta, strict=True)), metrics,
                               seq=self._next_seq, settings=s)
                for stage in self.delta_stages:
                    out = stage(out)
                if self._privacy is not None:
                    self.stats.epsilon = self._privacy.epsilon
                    if "epsilon" in out.metrics:
                        self.metrics.epsilon.set(out.metrics["epsilon"])
                elif "epsilon" in out.metrics:  # the trainer's own (DP-SGD: worker/dpsgd.py)
                    self.stats.epsilon = out.metrics["epsilon"]
                    self.metrics.epsilon.set(out.metrics["epsilon"])
                update = Update(self.config.party, self._next_seq, base_version,
                                len(trainer.y), out.tensors, out.metrics, self.config.encoding,
                                sealed_seed=out.sealed_seed,
                                seed_signature=out.seed_signature)
                self._pending = (self._next_seq, encode(update, packed=out.packed))
                self._next_seq += 1
                continue
            if self._announced is not None:
                self._pull(broker)
                continue
            model = self._latest
            if model is None or (s["sync"] and model.version <= self._last_base):
                broker.process_events(0.2)
                self._heartbeat(broker)
                continue
            base: NDArrays = [model.tensors[name] for name in trainer.names]
            options = {"proximal_mu": float(s["proximal_mu"])} if s.get("proximal_mu") else {}
            job = self._pool.submit(trainer.train, base, int(s["local_steps"]),
                                    int(s["batch_size"]), float(s["learning_rate"]), **options)
            job.add_done_callback(lambda _job: self._wake(broker))
            self._training = (model.version, job)
            self._last_base = model.version

    @staticmethod
    def _wake(broker: Broker) -> None:
        """End the event loop's wait as soon as training finishes (from the training
        thread): polling alone cost ~50 ms a round (``benchmarks/overhead.py``)."""
        with contextlib.suppress(FederationError):  # gone: the next session takes over
            broker.call_soon_threadsafe(lambda: None)

    def _publish_pending(self, broker: Broker) -> None:
        """Publish the pending update until the broker confirms it (backing off when full)."""
        assert self._pending is not None
        seq, body = self._pending

        def service(seconds: float) -> None:  # keep the connection and the lease alive
            deadline = time.monotonic() + seconds
            while not self._stop.is_set() and time.monotonic() < deadline:
                broker.process_events(min(0.2, max(deadline - time.monotonic(), 0)))
                self._heartbeat(broker)

        def rejected(state: object) -> None:
            self.stats.rejected_publishes += 1
            log.warning("party %s: updates queue full, update %d will be retried",
                        self.config.party, seq)

        began = time.perf_counter()
        try:
            for attempt in Retrying(retry=retry_if_exception_type(PublishRejected),
                                    wait=wait_exponential(multiplier=0.2, max=10),
                                    stop=lambda _s: self._stop.is_set(),
                                    sleep=service, before_sleep=rejected, reraise=True):
                with attempt:
                    self._send(broker, self.topology.updates, body, update=True)
        except PublishRejected:
            if self._stop.is_set():
                return  # stopping while the queue is full: the update stays pending
            raise
        self._pending = None
        self.metrics.publish_seconds.observe(time.perf_counter() - began)
        self.metrics.updates_sent.inc()
        self.stats.last_seq = seq
        self.stats.updates_sent += 1
        self.stats.update_bytes += len(body)
        if self.config.ledger:
            with open(self.config.ledger, "a") as f:
                f.write(json.dumps({"party": self.config.party, "seq": seq}) + "\n")
        if self._privacy is None:
            log.info("party %s sent update %d", self.config.party, seq)
        else:
            log.info("party %s sent update %d (privacy spent: epsilon %.4g at delta %g)",
                     self.config.party, seq, self.stats.epsilon, self.config.dp_delta)

    def _pull(self, broker: Broker) -> None:
        """Fetch an announced model that is too big for the model queue.

        The aggregator broadcasts a model over ``--max-chunk-bytes`` as a tensorless
        ``Model`` (the version alone): this party's queue keeps one message, so the chunks of
        a model would drop each other. The model comes by RPC instead (``Query("model")``,
        answered in chunks), only when this party is about to train: a slow party skips the
        versions in between without receiving them.
        """
        cfg, announced = self.config, self._announced
        self._announced = None  # a newer announcement during the call sets it again
        if announced is None or (self._latest is not None
                                 and announced <= self._latest.version):
            return
        try:
            msg = self._ask(broker, encode(Query("model")), "model")
        except (RpcTimeout, InvalidMessage) as exc:
            log.info("party %s: model version %d not fetched (%s); asking again", cfg.party,
                     announced, exc)
            if self._announced is None:
                self._announced = announced
            return
        if not isinstance(msg, Model) or not msg.tensors:
            log.info("party %s: asked for model version %d, got a %s", cfg.party, announced,
                     msg.KIND)
        else:
            self._take(msg)

    def _heartbeat(self, broker: Broker) -> None:
        """Renew the lease when it is due (called from every waiting loop)."""
        self.metrics.tick()
        now = time.monotonic()
        if now < self._next_beat:
            return
        version = self._latest.version if self._latest else -1
        self._send(broker, self.topology.control, encode(Heartbeat(self.config.party, version)))
        self._next_beat = now + self.config.heartbeat_seconds


    def _send(self, broker: Broker, queue: str, body: bytes, *, update: bool = False) -> None:
        """Publish to the aggregator's ``queue``, signed when this party has a key.

        Updates are persistent and mandatory (an unroutable update must not count as sent);
        heartbeats and leaves are fire-and-forget.
        """
        broker.publish(self.topology.ingress, queue, body,
                       headers=signature_headers(self._signer, body), persistent=update,
                       mandatory=update)

    def _ask(self, broker: Broker, body: bytes, what: str) -> Message:
        """An RPC to the aggregator (signed when this party has a key), its answer decoded.

        With ``--aggregator-key`` an answer the aggregator did not sign stops the party: a
        welcome or model from anyone else means the federation is not what it claims.
        """
        answer = broker.call(self.topology.control, body, timeout=self.config.join_timeout,
                             headers=signature_headers(self._signer, body),
                             exchange=self.topology.ingress)
        if self._trust is not None:
            try:
                self._trust.verify(answer.body, answer.headers)
            except InvalidMessage as exc:
                raise FederationError(f"the {what} is not signed by the aggregator's key "
                                      f"({exc}); check --aggregator-key") from None
        return decode(answer.body, self.config.max_message_bytes)

    def _take(self, model: Model) -> None:
        """Train on ``model`` next, unless a newer one is already here."""
        if self._latest is None or model.version > self._latest.version:
            self._latest = model
            self.stats.model_version = model.version
            self.metrics.model_version.set(model.version)

    def _on_model(self, d: Delivery) -> None:
        """The boundary of the model queue: whatever arrives and whatever handling it raises,
        the message is taken or ignored (logged and counted), and the worker keeps going.
        The queue is auto-acked and holds one message, so ignoring loses nothing newer."""
        try:
            self._handle_model(d)
        except InvalidMessage as exc:
            log.warning("party %s: ignored a bad model message: %s", self.config.party, exc)
            self.metrics.ignored.labels(exc.reason).inc()
        except FederationError:
            raise  # the broker went away, or the worker must stop: not this message's doing
        except Exception:  # a bug of ours that this message triggered
            log.exception("party %s: internal error on a model message (ignored)",
                          self.config.party)
            self.metrics.ignored.labels("internal-error").inc()

    def _handle_model(self, d: Delivery) -> None:
        check_envelope(d)
        if self._trust is not None:  # holds the aggregator's key alone
            self._trust.verify(d.body, d.headers)
        msg = decode(d.body, self.config.max_message_bytes)
        if isinstance(msg, Query) and msg.what == "rejoin":
            self._rejoin = True
        elif isinstance(msg, Stop):
            log.info("party %s: federation finished (%s)", self.config.party, msg.reason)
            self.stop(f"aggregator: {msg.reason}")
        elif isinstance(msg, Model) and not msg.tensors:  # too big to broadcast: fetch it
            if self._latest is None or msg.version > self._latest.version:
                self._announced = msg.version
        elif isinstance(msg, Model):
            self._take(msg)
