"""The party daemon: join, train on the newest global model, publish the delta, repeat.

The thread that calls ``run`` owns the broker connection and keeps servicing it (heartbeats,
incoming models) while Keras trains on a separate single-thread executor: a long ``fit`` never
starves AMQP heartbeats, and Keras objects never leave the training thread.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from messages.broker import Broker, Delivery, connect
from messages.codec import decode, encode
from messages.errors import FederationError, InvalidMessage, RpcTimeout
from messages.kinds import Heartbeat, Join, Leave, Model, Stop, Update, Welcome
from messages.plugins import load_dataset
from messages.topology import Topology
from messages.types import NDArrays
from worker.config import WorkerConfig
from worker.partition import partition_indices

if TYPE_CHECKING:
    from worker.training import LocalTrainer

log = logging.getLogger("dfl.worker")


@dataclass(slots=True)
class WorkerStats:
    """What a worker did, for tests, logs and notebooks."""

    updates_sent: int = 0
    last_seq: int = -1
    model_version: int = -1
    stopped_by: str = ""


class Worker:
    """One party. ``run()`` blocks until stopped; ``start()`` runs it on a thread."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.topology = Topology(config.federation, config.queue_type)
        self.stats = WorkerStats()
        self._stop = threading.Event()
        self._latest: Model | None = None
        self._thread: threading.Thread | None = None
        self._trainer: LocalTrainer | None = None
        self.error: BaseException | None = None

    # -- public API ------------------------------------------------------------------------
    def start(self) -> Worker:
        self._thread = threading.Thread(target=self._run_catching,
                                        name=f"worker-{self.config.party}", daemon=True)
        self._thread.start()
        return self

    def stop(self, reason: str = "stopped") -> None:
        """Stop after the current minibatch, send leave, close (safe from any thread)."""
        if not self.stats.stopped_by:
            self.stats.stopped_by = reason
        self._stop.set()
        if self._trainer is not None:
            self._trainer.interrupted.set()

    def wait(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
        if self.error is not None:
            raise self.error
        return True

    def _run_catching(self) -> None:
        try:
            self.run()
        except BaseException as exc:
            self.error = exc
            log.error("party %s stopped: %s", self.config.party, exc)

    # -- the daemon loop -------------------------------------------------------------------
    def run(self) -> WorkerStats:
        cfg = self.config
        with ThreadPoolExecutor(1, thread_name_prefix=f"train-{cfg.party}") as pool:
            trainer = pool.submit(self._build_trainer).result()
            self._trainer = trainer
            if self._stop.is_set():
                trainer.interrupted.set()
            broker = connect(cfg.broker)
            try:
                self.topology.declare(broker)
                queue = self.topology.declare_model_queue(broker, cfg.party)
                broker.consume(queue, self._on_model, auto_ack=True)
                welcome = self._join(broker, trainer)
                if welcome is not None:
                    self._loop(broker, pool, trainer, welcome)
                if not self.stats.stopped_by.startswith("aggregator"):
                    broker.publish("", self.topology.control,
                                   encode(Leave(cfg.party, self.stats.stopped_by)),
                                   persistent=False)
            finally:
                broker.close()
        log.info("party %s done: %d updates sent (%s)", cfg.party, self.stats.updates_sent,
                 self.stats.stopped_by)
        return self.stats

    def _build_trainer(self) -> LocalTrainer:
        from worker.training import LocalTrainer  # imports Keras: only where training happens

        cfg = self.config
        data = load_dataset(cfg.data, cfg.data_dir)
        shard = partition_indices(data.y_train, cfg.num_parties, cfg.partition, alpha=cfg.alpha,
                                  shards_per_party=cfg.shards_per_party,
                                  seed=cfg.seed)[cfg.party_id]
        log.info("party %s: %d training samples (%s partition)", cfg.party, len(shard),
                 cfg.partition)
        return LocalTrainer(cfg.model, data.x_train[shard], data.y_train[shard],
                            seed=cfg.seed + cfg.party_id, slowdown=cfg.slowdown)

    def _join(self, broker: Broker, trainer: LocalTrainer) -> Welcome | None:
        cfg = self.config
        join = encode(Join(cfg.party, len(trainer.y), trainer.initial(), software="dfl/0.1"))
        while not self._stop.is_set():
            try:
                reply = decode(broker.call(self.topology.control, join,
                                           timeout=cfg.join_timeout).body)
            except RpcTimeout:
                log.info("party %s: no answer from the aggregator yet, asking again", cfg.party)
                continue
            if not isinstance(reply, Welcome):
                raise FederationError(f"join answered with a {reply.KIND} message")
            if not reply.accepted:
                raise FederationError(f"the aggregator refused party {cfg.party}: "
                                      f"{reply.reason}")
            self.stats.last_seq = reply.last_seq
            if reply.tensors and (self._latest is None or self._latest.version < reply.version):
                self._latest = Model(reply.version, reply.tensors)
            if reply.tensors:
                log.info("party %s joined at model version %d", cfg.party, reply.version)
            else:
                log.info("party %s joined; waiting for the first model", cfg.party)
            return reply
        return None

    def _loop(self, broker: Broker, pool: ThreadPoolExecutor, trainer: LocalTrainer,
              welcome: Welcome) -> None:
        cfg = self.config
        settings = welcome.settings
        steps, batch = int(settings["local_steps"]), int(settings["batch_size"])
        lr, sync = float(settings["learning_rate"]), bool(settings["sync"])
        last_base = -1
        next_beat = time.monotonic() + cfg.heartbeat_seconds
        while not self._stop.is_set():
            model = self._latest
            if model is None or (sync and model.version <= last_base):
                broker.process_events(0.2)
                next_beat = self._heartbeat(broker, next_beat)
                continue
            base: NDArrays = [model.tensors[name] for name in trainer.names]
            future: Future[tuple[NDArrays, dict[str, float]] | None] = pool.submit(
                trainer.train, base, steps, batch, lr)
            while not future.done():
                broker.process_events(0.1)
                next_beat = self._heartbeat(broker, next_beat)
            result = future.result()
            if result is None:  # interrupted: stop or aggregator's stop
                break
            delta, metrics = result
            seq = self.stats.last_seq + 1
            update = Update(cfg.party, seq, model.version, len(trainer.y),
                            dict(zip(trainer.names, delta, strict=True)), metrics)
            broker.publish("", self.topology.updates, encode(update), mandatory=True)
            self.stats.last_seq = seq
            self.stats.updates_sent += 1
            last_base = model.version
            log.info("party %s sent update %d from version %d (loss %.4f)", cfg.party, seq,
                      model.version, metrics.get("loss", float("nan")))
            broker.process_events(0)

    def _heartbeat(self, broker: Broker, due: float) -> float:
        now = time.monotonic()
        if now < due:
            return due
        version = self._latest.version if self._latest else -1
        broker.publish("", self.topology.control, encode(Heartbeat(self.config.party, version)),
                       persistent=False)
        return now + self.config.heartbeat_seconds

    def _on_model(self, d: Delivery) -> None:
        try:
            msg = decode(d.body, self.config.max_message_bytes)
        except InvalidMessage as exc:
            log.warning("party %s: ignored a bad model message: %s", self.config.party, exc)
            return
        if isinstance(msg, Stop):
            log.info("party %s: federation finished (%s)", self.config.party, msg.reason)
            self.stop(f"aggregator: {msg.reason}")
        elif isinstance(msg, Model) and (self._latest is None
                                         or msg.version > self._latest.version):
            self._latest = msg
            self.stats.model_version = msg.version
