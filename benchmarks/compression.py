"""Delta compression on MNIST: bytes per update and accuracy at equal wall time vs float32.

Every run is a fresh federation in this process over its own ``memory://`` broker: the
aggregator (FedAsync, the defaults) and ``--parties`` workers (the built-in MNIST CNN, IID
shards, the same seed, so every run starts from the same model and data), all parties
sending their deltas in one encoding (``--encoding``, with error feedback for the lossy
ones). Each run gets the same wall budget (``--seconds``, worker start-up included); the
aggregator then stops the federation and evaluates the final global model on the 10,000
test images. float32 runs first (``--baseline-runs`` times, to show the run-to-run spread),
then float16, int8, and top-k at each ``--topk-fractions``.

Bytes per update are the encoded ``Update`` bodies the parties published (what crosses the
broker), averaged over every update sent. ``memory://`` has no bandwidth limit, so here
fewer bytes buy no wall time: the accuracy column shows what an encoding loses (and costs in
CPU), not what it saves on a slow link.

    python -m benchmarks.compression --data-dir DIR [--seconds 60] [--baseline-runs 2]

MNIST comes from ``--data-dir`` or ``DFL_DATA_DIR`` (else Keras's cache, downloading once).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from tabulate import tabulate

from aggregator import AggregatorConfig
from deploy.launcher import run_federation
from worker import Worker, WorkerConfig


@dataclass(frozen=True)
class Run:
    encoding: str
    fraction: float = 0.01

    @property
    def label(self) -> str:
        return f"topk {self.fraction:g}" if self.encoding == "topk" else self.encoding


def runs(args: argparse.Namespace) -> list[Run]:
    return ([Run("float32")] * args.baseline_runs + [Run("float16"), Run("int8")]
            + [Run("topk", f) for f in args.topk_fractions])


def federation(run: Run, args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    """One federation for ``seconds``; its final accuracy, counts and bytes."""
    broker = f"memory://compress-{uuid.uuid4().hex[:8]}"
    shared: dict[str, Any] = {"broker": broker, "seed": args.seed,
                              "model": args.model, "data": "worker.data:load_mnist"}
    if args.data_dir:  # else DFL_DATA_DIR, read by the settings themselves
        shared["data_dir"] = args.data_dir
    # one evaluation early and the final one: evaluating takes CPU from training
    workers: list[Worker] = []

    def make(config: WorkerConfig) -> Worker:
        workers.append(Worker(config))
        return workers[-1]

    agg = run_federation(AggregatorConfig(
        **shared, min_parties=args.parties, max_seconds=seconds,
        local_steps=args.local_steps, eval_every_seconds=2 * seconds),
        [WorkerConfig(**shared, party_id=i, num_parties=args.parties, encoding=run.encoding,
                      topk_fraction=run.fraction) for i in range(args.parties)],
        progress=False, make_worker=make)
    last = agg.history[-1] if agg.history else None
    sent = sum(w.stats.updates_sent for w in workers)
    return {"updates": agg.status.updates, "versions": agg.status.version, "sent": sent,
            "bytes": sum(w.stats.update_bytes for w in workers) / sent if sent else None,
            "accuracy": None if last is None else float(last["accuracy"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compression",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="MNIST folder (default: DFL_DATA_DIR, else Keras)")
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="wall budget per run, start-up included (default: 60)")
    parser.add_argument("--parties", type=int, default=2, help="parties (default: 2)")
    parser.add_argument("--local-steps", type=int, default=50,
                        help="minibatches per update (default: 50)")
    parser.add_argument("--topk-fractions", type=float, nargs="+", default=[0.1, 0.01],
                        metavar="F", help="top-k fractions to run (default: 0.1 0.01)")
    parser.add_argument("--baseline-runs", type=int, default=1,
                        help="float32 runs (default: 1; 2 or more show the run-to-run spread)")
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="seconds of an unreported float32 federation first, so the "
                             "first run does not also pay for importing TensorFlow and "
                             "reading MNIST (default: 10; 0 skips it)")
    parser.add_argument("--model", default="worker.models:mnist_cnn")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.baseline_runs < 1:
        parser.error("--baseline-runs must be at least 1: every ratio is against float32")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # retracing notices per party

    print(f"{args.parties} parties, {args.model}, {args.local_steps} local steps, IID, "
          f"FedAsync, {args.seconds:g} s per run; {os.cpu_count()} CPUs, "
          f"{platform.machine()}, Python {platform.python_version()}, numpy {np.__version__}")
    if args.warmup > 0:
        started = time.monotonic()
        federation(Run("float32"), args, args.warmup)
        print(f"  (warm-up: {time.monotonic() - started:.0f} s, not counted)", flush=True)
    results: list[tuple[Run, dict[str, Any]]] = []
    for run in runs(args):
        started = time.monotonic()
        r = federation(run, args, args.seconds)
        results.append((run, r))
        print(f"  {run.label}: accuracy {r['accuracy']}, {r['updates']} updates applied, "
              f"{r['bytes']} bytes/update ({time.monotonic() - started:.0f} s)", flush=True)

    base = [r for run, r in results if run.encoding == "float32"]
    base_bytes = statistics.mean(r["bytes"] for r in base if r["bytes"])
    base_acc = [r["accuracy"] for r in base if r["accuracy"] is not None]
    base_mean = statistics.mean(base_acc) if base_acc else None
    rows = []
    for run, r in results:
        acc = r["accuracy"]
        rows.append([
            run.label, "-" if r["bytes"] is None else f"{r['bytes']:,.0f}",
            "-" if r["bytes"] is None else f"{base_bytes / r['bytes']:.1f}x", r["updates"],
            "-" if acc is None else f"{100 * acc:.2f}",
            "" if acc is None or base_mean is None else f"{100 * (acc - base_mean):+.2f}"])
    print(tabulate(rows, headers=["encoding", "bytes/update", "fewer bytes", "updates applied",
                                  "test accuracy %", "vs float32 (points)"],
                   tablefmt="github", disable_numparse=True))
    if len(base_acc) > 1:
        print(f"float32 runs: {', '.join(f'{100 * a:.2f}' for a in base_acc)} % "
              f"(spread {100 * (max(base_acc) - min(base_acc)):.2f} points); 'vs float32' is "
              "against their mean")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
