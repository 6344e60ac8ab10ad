"""Aggregator throughput against raw broker throughput for the same bytes, in one run.

A publisher first fills a queue with N messages of one update's size (a separate process
for RabbitMQ; the same process for ``memory://``, the in-process broker), so what is timed
is the consumer draining it. Baseline: a plain pika consumer that only acks (no
decoding, no math). Then the aggregator (FedAsync or FedBuff, no evaluation, checkpoints
every 16 updates as in production) drains N valid updates from ``F.updates``: decode,
validate, apply, broadcast, checkpoint, ack. Both are timed from the first delivery to the
last, so start-up is not counted.

    python -m benchmarks.throughput [--broker URL ...] [--params 1.2] [--count 150]
        [--rounds 3] [--profile]
    python -m benchmarks.throughput --edges 1 2 [--edge-k 8] [--count 150] [--rounds 3]

With ``--edges``, the same queue is drained by a root (``--role root``, on this thread)
fed by N edge processes (``--role edge``), against one plain FedBuff aggregator, and the CPU
of each stage is reported per update: root, edges (all of them), broker.

``--broker`` defaults to the local RabbitMQ and ``memory://``, each against its own raw
baseline; each consumer is measured ``--rounds`` times, taking turns, and the medians compared.
``memory://`` hands a body over by reference, so its raw rate is the cost of a
queue operation and the aggregator's milliseconds per update are its own work alone.
"""

from __future__ import annotations

import argparse
import cProfile
import math
import multiprocessing as mp
import os
import pstats
import statistics
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass

from aggregator import Aggregator, AggregatorConfig
from benchmarks.codec import tensors_of
from benchmarks.scale import ProcessProbe, broker_pid
from messages.transport.broker import Delivery
from messages.transport.connect import connect
from messages.transport.topology import QUEUE_TYPES, Topology
from messages.wire.codec import decode, encode
from messages.wire.kinds import Join, Update, Welcome


def publish(url: str, queue: str, bodies: list[bytes]) -> None:
    """Publisher: confirmed, persistent publishes of ``bodies`` to ``queue``."""
    with connect(url) as broker:
        for body in bodies:
            broker.publish("", queue, body, mandatory=True)


def fill(url: str, queue: str, bodies: list[bytes]) -> None:
    """Fill ``queue`` before timing starts: from another process over the network, here for
    ``memory://`` (whose broker lives in this process)."""
    if url.startswith("memory://"):
        publish(url, queue, bodies)
        return
    proc = mp.get_context("spawn").Process(target=publish, args=(url, queue, bodies))
    proc.start()
    proc.join()


@dataclass
class Drain:
    """How long draining the queue took, and the CPU that this process (the consumer) and
    the local broker spent meanwhile: on 2 cores they compete, so CPU the consumer spends
    per message is CPU the broker does not get."""

    seconds: float
    consumer_cpu: float
    broker_cpu: float


class Clock:
    """Wall time and CPU seconds at the first and the last message of a drain."""

    def __init__(self) -> None:
        pid = broker_pid()
        self.beam = ProcessProbe(pid) if pid is not None else None
        self.marks: list[tuple[float, float, float]] = []

    def mark(self) -> None:
        self.marks.append((time.perf_counter(), time.process_time(),
                           self.beam.cpu_seconds() if self.beam is not None else math.nan))

    def drain(self, count: int) -> Drain:
        """Scaled from the first-to-last interval (count - 1 messages) to ``count``."""
        (t0, c0, b0), (t1, c1, b1) = self.marks[0], self.marks[-1]
        scale = count / (count - 1)
        return Drain((t1 - t0) * scale, (c1 - c0) * scale, (b1 - b0) * scale)


def raw(url: str, bodies: list[bytes], queue_type: str) -> Drain:
    """A plain ack-only consumer, from its first delivery to its last."""
    name = f"bench-raw-{uuid.uuid4().hex[:8]}"
    with connect(url) as broker:
        broker.declare_queue(name, arguments={"x-queue-type": queue_type})
        clock, seen = Clock(), [0]

        def on_message(d: Delivery) -> None:
            seen[0] += 1
            if seen[0] in (1, len(bodies)):
                clock.mark()
            broker.ack(d)

        fill(url, name, bodies)
        broker.consume(name, on_message, prefetch=32)  # the aggregator's default window
        while seen[0] < len(bodies):
            broker.process_events(0.1)
        broker.delete_queue(name)
    return clock.drain(len(bodies))


def aggregated(url: str, millions: float, count: int, strategy: str, queue_type: str,
               profile: cProfile.Profile | None = None) -> Drain:
    """From the first to the last applied update of a queue filled beforehand (the
    aggregator runs on this thread, so ``profile`` sees all of its work)."""
    federation = f"bench{uuid.uuid4().hex[:8]}"
    tensors = tensors_of(millions)
    with tempfile.TemporaryDirectory() as checkpoints:
        config = AggregatorConfig(
            broker=url, federation=federation, strategy=strategy, buffer_k=4, evaluate=False,
            min_parties=1, max_staleness=10**9, queue_type=queue_type,
            checkpoint_dir=checkpoints, max_message_bytes=1 << 30)
        setup = Aggregator(config).start()  # registers the party, then stops (checkpointed)
        topology = Topology(federation, queue_type)
        with connect(url) as broker:
            topology.declare(broker)
            welcome = decode(broker.call(topology.control, encode(Join("bench", 100, tensors)),
                                         timeout=30).body)
            assert isinstance(welcome, Welcome) and welcome.accepted
            setup.stop()
            setup.wait(60)
            bodies = [encode(Update("bench", welcome.next_seq + i, 0, 100, tensors))
                      for i in range(count)]
            fill(url, topology.updates, bodies)
            agg = Aggregator(config)  # resumes, then drains the full queue
            clock = Clock()

            def watch() -> None:
                while agg.status.updates == 0:
                    time.sleep(0.001)
                clock.mark()
                while agg.status.updates < count:
                    time.sleep(0.001)
                clock.mark()
                agg.stop()

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            if profile is None:
                agg.run()
            else:
                profile.runcall(agg.run)
            watcher.join()
            for q in (topology.updates, topology.control, topology.dead):
                broker.delete_queue(q)
    return clock.drain(count)


def _run_edge(options: dict[str, object]) -> None:
    """An edge aggregator process (spawned: it shares no interpreter with the root)."""
    from aggregator.edge import Edge

    Edge(AggregatorConfig(**options)).run()  # type: ignore[arg-type]


@dataclass
class ScaledDrain(Drain):
    """A drain through edges: the root's CPU is ``consumer_cpu``; the edges' too."""

    edges_cpu: float


def through_edges(url: str, millions: float, count: int, edges: int, edge_k: int,
                  queue_type: str) -> ScaledDrain:
    """From the first to the last update applied by a root (on this thread, as the plain
    aggregator above) fed by ``edges`` edge processes, the queue filled beforehand."""
    federation = f"bench{uuid.uuid4().hex[:8]}"
    tensors = tensors_of(millions)
    common: dict[str, object] = dict(
        broker=url, federation=federation, strategy="fedbuff", buffer_k=edge_k,
        evaluate=False, min_parties=1, max_staleness=10**9, queue_type=queue_type,
        max_message_bytes=1 << 30)
    with tempfile.TemporaryDirectory() as checkpoints:
        config = AggregatorConfig(**common, role="root",  # type: ignore[arg-type]
                                  checkpoint_dir=checkpoints)
        root = Aggregator(config).start()
        topology = Topology(federation, queue_type)
        procs: list[mp.process.BaseProcess] = []
        with connect(url) as broker:
            topology.declare(broker)
            welcome = decode(broker.call(topology.control, encode(Join("bench", 100, tensors)),
                                         timeout=30).body)
            assert isinstance(welcome, Welcome) and welcome.accepted
            bodies = [encode(Update("bench", welcome.next_seq + i, 0, 100, tensors))
                      for i in range(count)]
            fill(url, topology.updates, bodies)
            ctx = mp.get_context("spawn")
            for i in range(edges):
                proc = ctx.Process(target=_run_edge, args=(
                    {**common, "role": "edge", "edge_id": f"edge-{i}", "edge_k": edge_k},))
                proc.start()
                procs.append(proc)
            probes = [ProcessProbe(proc.pid) for proc in procs if proc.pid is not None]
            clock = Clock()
            marks: list[float] = []
            while root.status.updates == 0:
                time.sleep(0.001)
            clock.mark()
            marks.append(sum(p.cpu_seconds() for p in probes))
            while root.status.updates < count:
                time.sleep(0.001)
            clock.mark()
            marks.append(sum(p.cpu_seconds() for p in probes))
            for proc in procs:
                proc.kill()
                proc.join()
            root.stop()
            root.wait(60)
            for q in (topology.updates, topology.control, topology.dead, topology.partials):
                broker.delete_queue(q)
    drain = clock.drain(count)
    return ScaledDrain(drain.seconds, drain.consumer_cpu, drain.broker_cpu,
                       (marks[1] - marks[0]) * count / (count - 1))


def edges_main(ns: argparse.Namespace) -> int:
    """``--edges N ...``: a root fed by N edge processes against one plain aggregator
    process, the same updates through the same broker, rounds taking turns."""
    url = ns.broker[0]
    if url.startswith("memory://"):
        raise SystemExit("--edges needs RabbitMQ: edges are processes of their own")
    body = encode(Update("bench", 0, 0, 100, tensors_of(ns.params)))
    mb = len(body) / 1e6
    print(f"\n{ns.count} updates of {mb:.1f} MB ({ns.params}M float32), {ns.queue_type} "
          f"queue, broker {url.split('@')[-1]}; FedBuff k={ns.edge_k}, partials of "
          f"{ns.edge_k}; {os.cpu_count()} cores")
    who = ["single", *(f"{n} edges" for n in ns.edges)]
    drains: dict[str, list[Drain]] = {w: [] for w in who}
    for round_ in range(ns.rounds):
        for w in _rotated(who, round_):
            if w == "single":
                drains[w].append(aggregated(url, ns.params, ns.count, "fedbuff",
                                            ns.queue_type))
            else:
                drains[w].append(through_edges(url, ns.params, ns.count, int(w.split()[0]),
                                               ns.edge_k, ns.queue_type))
    rates = {w: statistics.median(ns.count / d.seconds for d in runs)
             for w, runs in drains.items()}
    first = next((w for w in who if w != "single"), "single")
    print(f"{'aggregation':<12} {'applied/s':>9} {'MB/s':>7} {'vs single':>9} "
          f"{'vs ' + first:>10}  CPU ms/update: {'root':>6} {'edges':>6} {'broker':>7}  "
          f"runs (/s)")
    for w, runs in drains.items():
        cpu = {k: statistics.median(getattr(d, k, math.nan) / ns.count * 1e3 for d in runs)
               for k in ("consumer_cpu", "edges_cpu", "broker_cpu")}
        print(f"{w:<12} {rates[w]:9.1f} {rates[w] * mb:7.1f} {rates[w] / rates['single']:8.2f}x "
              f"{rates[w] / rates[first]:9.2f}x  {'':14} {cpu['consumer_cpu']:6.2f} "
              f"{cpu['edges_cpu']:6.2f} {cpu['broker_cpu']:7.2f}  "
              f"{' '.join(f'{ns.count / d.seconds:.0f}' for d in runs)}")
    return 0


def _rotated(items: list[str], k: int) -> list[str]:
    return items[k % len(items):] + items[:k % len(items)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", nargs="+",
                        default=["amqp://guest:guest@localhost:5672/%2F", "memory://bench"])
    parser.add_argument("--params", type=float, default=1.2, help="millions of parameters")
    parser.add_argument("--count", type=int, default=150, help="messages per measurement")
    parser.add_argument("--queue-type", default="quorum", choices=QUEUE_TYPES)
    parser.add_argument("--rounds", type=int, default=3,
                        help="measurements of each consumer, taking turns (medians reported)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile each aggregator run: where its time goes")
    parser.add_argument("--edges", type=int, nargs="+", metavar="N",
                        help="instead: a root fed by N edge processes (for each N given) "
                             "against one plain aggregator, on the first --broker (RabbitMQ)")
    parser.add_argument("--edge-k", type=int, default=8,
                        help="with --edges: updates per partial sum, and the root's buffer")
    ns = parser.parse_args(argv)
    if ns.edges:
        return edges_main(ns)
    body = encode(Update("bench", 0, 0, 100, tensors_of(ns.params)))
    mb = len(body) / 1e6
    for url in ns.broker:
        where = "in-process memory://" if url.startswith("memory://") else url.split("@")[-1]
        print(f"\n{ns.count} messages of {mb:.1f} MB ({ns.params}M float32), {ns.queue_type} "
              f"queue, persistent + confirms, broker {where}")
        # The broker's own rate drifts between runs (quorum-queue segments, Erlang GC), so
        # the three consumers take turns, --rounds times in rotating order, and the ratios
        # are between medians.
        drains: dict[str, list[Drain]] = {"raw": [], "fedasync": [], "fedbuff": []}
        profiles: dict[str, cProfile.Profile] = {}
        for round_ in range(ns.rounds):
            for who in _rotated(list(drains), round_):
                if who == "raw":
                    drains[who].append(raw(url, [body] * ns.count, ns.queue_type))
                    continue
                profile = profiles.setdefault(who, cProfile.Profile()) if ns.profile else None
                drains[who].append(aggregated(url, ns.params, ns.count, who, ns.queue_type,
                                              profile))
        base_rate = statistics.median(ns.count / d.seconds for d in drains["raw"])
        print(f"{'consumer':<20} {'rate /s':>9} {'MB/s':>8} {'ms':>7} {'vs raw':>7} "
              f"{'CPU ms/msg: consumer':>21} {'broker':>7}  runs (/s)")
        for who, runs in drains.items():
            rate = statistics.median(ns.count / d.seconds for d in runs)
            mine = statistics.median(d.consumer_cpu / ns.count * 1e3 for d in runs)
            theirs = statistics.median(d.broker_cpu / ns.count * 1e3 for d in runs)
            label = "raw consume+ack" if who == "raw" else f"aggregator {who}"
            print(f"{label:<20} {rate:9.1f} {rate * mb:8.1f} {1e3 / rate:7.3f} "
                  f"{rate / base_rate:6.3f}x {mine:21.3f} {theirs:7.3f}  "
                  f"{' '.join(f'{ns.count / d.seconds:.0f}' for d in runs)}")
            if who in profiles:
                breakdown(profiles[who], ns.count * ns.rounds)
    return 0


STAGES = {  # (file suffix, function) -> stage; cumulative time per stage
    ("messages/wire/codec.py", "decode"): "decode",
    ("aggregator/validation.py", "check_update"): "validate",
    ("aggregator/strategies.py", "offer"): "apply",
    ("aggregator/service.py", "_broadcast"): "broadcast",
    ("aggregator/service.py", "_commit"): "checkpoint + ack",
    ("messages/transport/rabbitmq.py", "process_events"): "broker I/O (all handlers inside)",
    ("messages/transport/memory.py", "process_events"): "broker I/O (all handlers inside)",
}


def breakdown(profile: cProfile.Profile, count: int) -> None:
    """Milliseconds per update spent in each stage (cumulative, profiler overhead included)."""
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    for (path, _line, func), (_cc, _nc, _tt, cumulative, _callers) in stats.items():
        for (suffix, name), stage in STAGES.items():
            if path.endswith(suffix) and func == name:
                print(f"    {stage:<34} {cumulative / count * 1e3:7.2f} ms/update")


if __name__ == "__main__":
    raise SystemExit(main())
