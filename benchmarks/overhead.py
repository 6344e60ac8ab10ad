"""Worker overhead: the share of a party's wall time spent outside Keras ``fit``.

Real ``Worker`` daemons (the built-in MNIST CNN, IID shards, the aggregator's default local
steps and batch size) and an ``Aggregator`` (no evaluation, so that the only training on
the CPU is the parties') run in this process over ``memory://`` (``--broker amqp://...``
for RabbitMQ), once per ``--strategies`` entry: FedAsync, where a party trains again at
once on the newest model it has, and sync FedAvg as the contrast, where a party waits for
every party's update to make the next model.

Nothing in the worker is changed to measure it; from outside:

- the trainer the worker builds is wrapped (as ``benchmarks.robustness`` does): the time of
  every ``train()`` call and of the Keras ``fit`` inside it (the model's ``fit`` wrapped);
  ``train()`` minus ``fit`` is ``set_weights``, picking the batch indices, ``get_weights``
  and the delta subtraction;
- ``encode`` as ``worker.service`` calls it is wrapped, timing the updates' encoding;
- publish + confirm is the worker's own ``dfl_worker_publish_seconds`` histogram sum;
- the rest of the wall time is the loop itself: noticing that training finished (the
  service thread polls the training job every 0.1 s while it services the broker) and,
  after publishing, waiting for a model to train on (sync FedAvg waits for the round).

Wall time per party runs from the start of its first ``train()`` (it starts training as
soon as it has a model: the welcome or the first broadcast) to ``stop()``; training cut
short by the stop counts up to the stop. The first ``fit`` traces the model (about 5 s on
this CPU), which counts as fit; the ``steady`` figures start at the second round.

    python -m benchmarks.overhead --data-dir DIR [--seconds 60] [--strategies fedasync fedavg]

MNIST comes from ``--data-dir`` or ``DFL_DATA_DIR`` (else Keras's cache, downloading once).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tabulate import tabulate

import worker.service
from aggregator import Aggregator, AggregatorConfig
from aggregator.strategies import STRATEGIES
from messages.transport.broker import Broker
from messages.transport.connect import connect
from messages.types import NDArrays
from messages.wire.kinds import Message, Update
from worker import Worker, WorkerConfig
from worker.trainers import build_trainer

if TYPE_CHECKING:
    from worker.trainers import Trainer

Interval = tuple[float, float]


@dataclass
class Record:
    """What one party did, as ``time.perf_counter()`` intervals."""

    train: list[Interval] = field(default_factory=list)
    fit: list[Interval] = field(default_factory=list)
    encode: list[Interval] = field(default_factory=list)
    publish: list[Interval] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class TimedTrainer:
    """The worker's :class:`~worker.training.LocalTrainer`, timed: each ``train()`` and the
    Keras ``fit`` inside it. Everything else is the real trainer's."""

    def __init__(self, inner: Trainer, record: Record) -> None:
        self.inner = inner
        self.record = record
        fit = inner.model.fit

        def timed_fit(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return fit(*args, **kwargs)
            finally:
                with record.lock:
                    record.fit.append((began, time.perf_counter()))

        inner.model.fit = timed_fit

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def train(self, base: NDArrays, steps: int, batch_size: int, learning_rate: float,
              *, proximal_mu: float = 0.0) -> tuple[NDArrays, dict[str, float]] | None:
        began = time.perf_counter()
        try:
            return self.inner.train(base, steps, batch_size, learning_rate,
                                   proximal_mu=proximal_mu)
        finally:
            with self.record.lock:
                self.record.train.append((began, time.perf_counter()))


class TimedWorker(Worker):
    """A real worker whose trainer is a :class:`TimedTrainer` and whose sends of updates
    (publish until the broker's confirm) are timed."""

    def __init__(self, config: WorkerConfig, record: Record) -> None:
        super().__init__(config, trainer_factory=lambda cfg, pid: TimedTrainer(
            build_trainer(cfg, pid), record))
        self.record = record

    def _send(self, broker: Broker, queue: str, body: bytes, *, update: bool = False) -> None:
        began = time.perf_counter()
        try:
            super()._send(broker, queue, body, update=update)
        finally:
            if update:
                with self.record.lock:
                    self.record.publish.append((began, time.perf_counter()))


def timing_encode(records: dict[str, Record]) -> Callable[[], None]:
    """Wrap ``encode`` as ``worker.service`` calls it; returns the undo. Only updates are
    timed (heartbeats and joins are not the per-round cost)."""
    original: Callable[..., bytes] = worker.service.encode  # type: ignore[attr-defined]

    def encode(msg: Message, **options: Any) -> bytes:
        began = time.perf_counter()
        body = original(msg, **options)
        if isinstance(msg, Update) and msg.party in records:
            r = records[msg.party]
            with r.lock:
                r.encode.append((began, time.perf_counter()))
        return body

    worker.service.encode = encode  # type: ignore[attr-defined]

    def undo() -> None:
        worker.service.encode = original  # type: ignore[attr-defined]

    return undo


def clipped(intervals: list[Interval], start: float, end: float) -> float:
    """Total length of ``intervals`` inside ``[start, end]``."""
    return sum(max(0.0, min(b, end) - max(a, start)) for a, b in intervals)


def histogram_sum(histogram: Any) -> float:
    """The ``_sum`` sample of a prometheus_client histogram (its public collect API)."""
    for metric in histogram.collect():
        for sample in metric.samples:
            if sample.name.endswith("_sum"):
                return float(sample.value)
    return 0.0


def breakdown(record: Record, start: float, stop: float) -> dict[str, float]:
    """Seconds of ``[start, stop]`` in each activity; the rest is the loop itself."""
    wall = stop - start
    fit = clipped(record.fit, start, stop)
    train = clipped(record.train, start, stop)
    encode = clipped(record.encode, start, stop)
    publish = clipped(record.publish, start, stop)
    # from the end of a finished training round to the start of its update's encoding
    ends = sorted(b for _a, b in record.train if start <= b <= stop)
    notice = 0.0
    for a, _b in sorted(record.encode):
        before = [e for e in ends if e <= a]
        if before:
            notice += a - before[-1]
    rest = wall - train - encode - publish
    return {"wall": wall, "fit": fit, "train_other": train - fit, "encode": encode,
            "publish": publish, "notice": notice, "wait": rest - notice,
            "rounds": sum(1 for a, b in record.train if start <= a and b <= stop)}


def run(strategy: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One federation of ``args.parties`` timed workers for ``args.seconds``."""
    federation = f"overhead{uuid.uuid4().hex[:8]}"
    broker = (f"memory://{federation}" if args.broker == "memory://" else args.broker)
    shared: dict[str, Any] = {"broker": broker, "federation": federation, "seed": args.seed,
                              "model": args.model, "data": "worker.data:load_mnist"}
    if args.data_dir:  # else DFL_DATA_DIR, read by the settings themselves
        shared["data_dir"] = args.data_dir
    agg_options: dict[str, Any] = {}
    if args.local_steps:
        agg_options["local_steps"] = args.local_steps
    agg = Aggregator(AggregatorConfig(**shared, strategy=strategy, min_parties=args.parties,
                                      evaluate=False, **agg_options)).start()
    records = {str(i): Record() for i in range(args.parties)}
    undo = timing_encode(records)
    workers: list[TimedWorker] = []
    try:
        for i in range(args.parties):
            config = WorkerConfig(**shared, party_id=i, num_parties=args.parties)
            workers.append(TimedWorker(config, records[str(i)]))
            workers[-1].start()
        deadline = time.monotonic() + 600
        while not all(r.train for r in records.values()):
            if time.monotonic() > deadline:
                raise RuntimeError("the workers did not start training within 10 minutes")
            time.sleep(0.05)
        began = time.perf_counter()
        cpu0 = time.process_time()
        time.sleep(args.seconds)
        stop = time.perf_counter()
        cpu = time.process_time() - cpu0
        for w in workers:
            w.stop()
        for w in workers:
            w.wait(120)
    finally:
        undo()
        for w in workers:
            w.stop()
        agg.stop()
        agg.wait(60)
        if not broker.startswith("memory://"):  # durable queues outlive the run: remove them
            with connect(broker) as b:
                for q in (agg.topology.updates, agg.topology.control, agg.topology.dead):
                    b.delete_queue(q)
    rows = []
    for i, w in enumerate(workers):
        r = records[str(i)]
        first = r.train[0][0]
        whole = breakdown(r, first, stop)
        steady = breakdown(r, r.train[1][0] if len(r.train) > 1 else stop, stop)
        rows.append({"strategy": strategy, "party": i, "whole": whole, "steady": steady,
                     "publish_histogram": histogram_sum(w.metrics.publish_seconds),
                     "updates": w.stats.updates_sent, "cpu": cpu / (stop - began),
                     "versions": agg.status.version, "first_fit": r.fit[0][1] - r.fit[0][0]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="MNIST folder (default: DFL_DATA_DIR, else Keras)")
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="measured wall time per strategy, from the later party's first "
                             "round (default: 60)")
    parser.add_argument("--strategies", nargs="+", default=["fedasync", "fedavg"],
                        choices=STRATEGIES,
                        help="one federation each (default: fedasync fedavg)")
    parser.add_argument("--parties", type=int, default=2, help="workers (default: 2)")
    parser.add_argument("--local-steps", type=int, default=0,
                        help="minibatches per round (default: the aggregator's default)")
    parser.add_argument("--broker", default="memory://",
                        help="memory:// (default, one process) or an amqp:// URL")
    parser.add_argument("--model", default="worker.models:mnist_cnn")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # as the daemons' CLI does
    steps = args.local_steps or AggregatorConfig.model_fields["local_steps"].default
    batch = AggregatorConfig.model_fields["batch_size"].default
    load = os.getloadavg()
    print(f"{args.parties} workers, {args.model}, {steps} local steps of {batch}, IID, "
          f"broker {args.broker.split('@')[-1]}, {args.seconds:g} s measured per strategy; "
          f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}; "
          f"load average {load[0]:.1f}", flush=True)
    rows = []
    for strategy in args.strategies:
        rows += run(strategy, args)
        print(f"  {strategy}: done", flush=True)
    table = []
    for r in rows:
        for span in ("whole", "steady"):
            b = r[span]
            wall = b["wall"]

            def pct(x: float, wall: float = wall) -> str:
                return f"{100 * x / wall:.2f}"

            table.append([r["strategy"], r["party"], span, f"{wall:.1f}", b["rounds"],
                          pct(b["fit"]), pct(wall - b["fit"]), pct(b["train_other"]),
                          pct(b["encode"]), pct(b["publish"]), pct(b["notice"]),
                          pct(b["wait"])])
    print()
    print(tabulate(table, headers=["strategy", "party", "span", "wall s", "rounds", "fit %",
                                   "outside fit %", "train() not fit %", "encode %",
                                   "publish+confirm %", "noticing %", "waiting/loop %"],
                   tablefmt="github"))
    print()
    per_round = []
    for r in rows:
        b = r["steady"]
        n = max(1, b["rounds"])

        def ms(x: float, n: int = n) -> str:
            return f"{1000 * x / n:.1f}"

        per_round.append([r["strategy"], r["party"], b["rounds"], ms(b["wall"]), ms(b["fit"]),
                          ms(b["train_other"]), ms(b["encode"]), ms(b["publish"]),
                          ms(b["notice"]), ms(b["wait"])])
    print(tabulate(per_round, headers=["strategy", "party", "rounds (steady)", "ms/round",
                                       "fit", "train() not fit", "encode", "publish+confirm",
                                       "noticing", "waiting/loop"], tablefmt="github"))
    for r in rows:
        print(f"{r['strategy']} party {r['party']}: {r['updates']} updates sent, first fit "
              f"{r['first_fit']:.1f} s, process CPU {100 * r['cpu']:.0f}% of one core "
              f"during the window, global version {r['versions']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
