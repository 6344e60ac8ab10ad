"""One large model's update end to end in chunks, against raw pika moving the same chunks.

A 50M-parameter float32 delta is 200 MB: over RabbitMQ 4's 16 MiB and 3.x's 128 MiB
max_message_size, so it only travels in chunks (``messages.wire.chunks``). For each size, in
one run, best of ``--repeat`` (by end-to-end time):

- chunked, the framework's path: a publisher process encodes one ``Update``, cuts it into
  chunks of ``--chunk-mib`` with the SHA-256 of the whole body, and publishes them through
  ``ChunkedBroker`` (persistent, one confirm per chunk) to a durable queue of
  ``--queue-type``; this process consumes them through ``ChunkedBroker`` (reassembly and
  hash check), decodes and validates the update as the aggregator does, applies it with
  FedAsync into a weight set of the same size, and acks its chunks.
- raw, the baseline: the publisher process publishes the same bytes in chunks of the same
  size through a plain connection (no chunk headers, no hash), persistent with confirms, and
  this process consumes and acks them (no reassembly, no decoding).

Both consumers are subscribed before the publisher starts, so transfer and consumption
overlap as in production. End to end is from the first publish to the update applied (raw:
to the last ack); encoding is reported beside it. Times across the two processes use the
system-wide monotonic clock.

    python -m benchmarks.large_model [--broker URL] [--params 10,50] [--chunk-mib 8]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event
from typing import Any

import numpy as np

from aggregator.dedupe import AppliedSeqs
from aggregator.staleness import make_staleness
from aggregator.strategies import Contribution, FedAsync
from aggregator.validation import check_update
from benchmarks.codec import tensors_of
from messages.transport.broker import Broker, Delivery
from messages.transport.chunked import ChunkedBroker
from messages.transport.connect import connect
from messages.transport.topology import QUEUE_TYPES
from messages.types import spec_of
from messages.wire.chunks import chunk_count, split
from messages.wire.codec import decode, encode
from messages.wire.kinds import Update

MIB = 1024 * 1024


def publisher(url: str, queue: str, millions: float, chunk: int, chunked: bool,
              ready: Event, go: Event, out: Any) -> None:
    """The party's process: build the delta, wait for ``go``, encode and publish it."""
    tensors = tensors_of(millions, seed=1)
    broker: Broker = connect(url)
    try:
        ready.set()
        go.wait()
        t0 = time.monotonic()
        body = encode(Update("bench", 0, 0, 100, tensors))
        t1 = time.monotonic()
        times = {"encode": t1 - t0, "bytes": len(body)}
        if chunked:
            started = time.monotonic()
            split(body, chunk)  # measured alone: the SHA-256 that publish computes again
            times["hash"] = time.monotonic() - started
            publishing = ChunkedBroker(broker, max_chunk_bytes=chunk, sender="bench")
            times["start"] = time.monotonic()
            publishing.publish("", queue, body, mandatory=True)
        else:
            times["start"] = time.monotonic()
            for i in range(0, len(body), chunk):
                broker.publish("", queue, body[i:i + chunk], mandatory=True)
        times["published"] = time.monotonic()
        out.put(times)
    finally:
        broker.close()


class Stamped(ChunkedBroker):
    """``ChunkedBroker`` that notes when the first and the last chunk arrived."""

    first = last = 0.0

    def _on_delivery(self, sub: Any, d: Delivery) -> None:
        self.last = time.monotonic()
        self.first = self.first or self.last
        super()._on_delivery(sub, d)


@dataclass
class Run:
    stages: dict[str, float] = field(default_factory=dict)
    e2e: float = 0.0


def run_once(url: str, millions: float, chunk: int, queue_type: str, chunked: bool,
             names: list[str], weights: list[np.ndarray], strategy: FedAsync,
             window: int) -> Run:
    ctx = mp.get_context("spawn")
    queue = f"bench-large-{uuid.uuid4().hex[:8]}"
    ready, go, out = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=publisher, args=(url, queue, millions, chunk, chunked, ready, go,
                                                out))
    proc.start()
    broker: Broker = (Stamped(connect(url), max_chunk_bytes=chunk, max_message_bytes=1 << 30)
                      if chunked else connect(url))
    run = Run()
    try:
        broker.declare_queue(queue, arguments={"x-queue-type": queue_type})
        done: list[float] = []
        got, last_ack = [0], [0.0]

        def raw_message(d: Delivery) -> None:
            got[0] += len(d.body)
            broker.ack(d)
            last_ack[0] = time.monotonic()

        def update_message(d: Delivery) -> None:
            whole = time.monotonic()
            message = decode(d.body, 1 << 30)
            decoded = time.monotonic()
            update = check_update(message, parties={"bench"}, spec=spec_of(
                dict(zip(names, weights, strict=True))), version=0, max_staleness=10,
                applied=AppliedSeqs(), max_abs=1e4)
            assert update is not None
            validated = time.monotonic()
            strategy.offer(weights, Contribution("bench", list(update.tensors.values()), 100, 0))
            applied = time.monotonic()
            broker.ack(d)
            acked = time.monotonic()
            assert isinstance(broker, Stamped)
            run.stages.update({
                "reassembly tail (join + hash after the last chunk)": whole - broker.last,
                "decode": decoded - whole, "validate": validated - decoded,
                "apply (FedAsync)": applied - validated, "ack chunks": acked - applied})
            run.stages["_first"], run.stages["_whole"] = broker.first, whole
            done.append(applied)

        broker.consume(queue, update_message if chunked else raw_message, prefetch=(
            16 if chunked else window))
        ready.wait(300)
        go.set()
        times: dict[str, float] = {}
        while not done:
            broker.process_events(0.05)
            if not times and not out.empty():
                times = out.get()
            if not chunked and times and got[0] == times["bytes"]:
                done.append(last_ack[0])
        if not times:
            times = out.get(timeout=300)
        proc.join(60)
        start = times["start"]
        run.stages["encode (publisher)"] = times["encode"]
        if chunked:
            run.stages["sha-256 of the body (publisher)"] = times["hash"]
            run.stages["publish chunks, hash included (confirms)"] = times["published"] - start
            run.stages["consume + reassemble (first chunk -> whole)"] = (
                run.stages.pop("_whole") - run.stages.pop("_first"))
        else:
            run.stages["publish chunks (confirms)"] = times["published"] - start
        run.e2e = done[0] - start
        order = ["encode (publisher)", "sha-256 of the body (publisher)",
                 "publish chunks, hash included (confirms)", "publish chunks (confirms)",
                 "consume + reassemble (first chunk -> whole)"]
        run.stages = {k: run.stages[k] for k in order if k in run.stages} | {
            k: v for k, v in run.stages.items() if k not in order}
        run.stages["bytes"] = times["bytes"]
    finally:
        broker.delete_queue(queue)
        broker.close()
        if proc.is_alive():
            proc.kill()
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.large_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    parser.add_argument("--params", default="10,50", help="millions of parameters, commas")
    parser.add_argument("--chunk-mib", type=float, default=8.0, help="chunk size in MiB")
    parser.add_argument("--queue-type", default="quorum", choices=QUEUE_TYPES)
    parser.add_argument("--repeat", type=int, default=3, help="runs per path; best is shown")
    ns = parser.parse_args(argv)
    chunk = int(ns.chunk_mib * MIB)
    decode(encode(Update("warm-up", 0, 0, 1, tensors_of(0.01))))  # first-call imports
    for millions in (float(p) for p in ns.params.split(",")):
        template = tensors_of(millions, seed=1)
        names, weights = list(template), [np.zeros(a.shape, a.dtype) for a in template.values()]
        size = sum(a.nbytes for a in template.values())
        strategy = FedAsync(make_staleness("constant"))  # as in a running aggregator: its
        strategy.offer(weights, Contribution("bench", [np.zeros_like(w) for w in weights],
                                             100, 0))  # scratch buffers already exist
        del template
        count = chunk_count(size + 4096, chunk)
        window = 16 * count
        best: dict[bool, Run] = {}
        for _ in range(ns.repeat):
            for chunked in (False, True):
                r = run_once(ns.broker, millions, chunk, ns.queue_type, chunked, names,
                             weights, strategy, window)
                if chunked not in best or r.e2e < best[chunked].e2e:
                    best[chunked] = r
        mb = best[True].stages.pop("bytes") / 1e6
        best[False].stages.pop("bytes")
        print(f"\n{millions:g}M float32 parameters: one {mb:.1f} MB update in {count} chunks of "
              f"{ns.chunk_mib:g} MiB, {ns.queue_type} queue, persistent + confirms; "
              f"best of {ns.repeat}")
        print("| stage | seconds | MB/s |\n| --- | --- | --- |")
        for name, seconds in best[True].stages.items():
            print(f"| {name} | {seconds:.3f} | {mb / seconds:,.0f} |")
        chunked_e2e, raw_e2e = best[True].e2e, best[False].e2e
        print(f"| **chunked end to end** (first publish -> applied) | {chunked_e2e:.3f} | "
              f"{mb / chunked_e2e:,.0f} |")
        for name, seconds in best[False].stages.items():
            print(f"| raw: {name} | {seconds:.3f} | {mb / seconds:,.0f} |")
        print(f"| **raw end to end** (first publish -> last ack) | {raw_e2e:.3f} | "
              f"{mb / raw_e2e:,.0f} |")
        print(f"chunked / raw end to end: {chunked_e2e / raw_e2e:.2f}x the time "
              f"({raw_e2e / chunked_e2e:.2f}x raw throughput); peak RSS of this process "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
