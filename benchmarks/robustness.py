"""One malicious party on MNIST with the real stack: plain averaging against the robust options.

Every scenario is a fresh federation in this process over its own ``memory://`` broker: the
aggregator and ``--parties`` workers (the built-in MNIST CNN, IID shards, the same seed, so
every scenario starts from the same model and data). In the attacked scenarios party 0 is
malicious: it trains honestly on its shard and then sends ``--factor`` times its delta
(default -4, a scaled sign flip; +10 is a scaled-up one). Each scenario gets the same wall
budget (``--seconds``, worker start-up included); the aggregator then stops the federation
and evaluates the final global model on the 10,000 test images. The table shows that
accuracy and its difference to the clean run of the same strategy.

    python -m benchmarks.robustness --data-dir DIR [--seconds 60] [--factor -4]

MNIST comes from ``--data-dir`` or ``DFL_DATA_DIR`` (else Keras's cache, downloading once).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from tabulate import tabulate

from aggregator import AggregatorConfig
from deploy.launcher import run_federation
from messages.types import NDArrays
from worker import Worker, WorkerConfig
from worker.trainers import build_trainer

if TYPE_CHECKING:
    from worker.trainers import Trainer

MALICIOUS_PARTY = 0


class ScaledTrainer:
    """A party's :class:`~worker.training.LocalTrainer` that reports ``factor`` times its
    honest delta: the attack. Everything else (the model, ``interrupted``, ``initial``) is
    the honest trainer's, so the worker cannot tell the difference."""

    def __init__(self, honest: Trainer, factor: float) -> None:
        self.honest = honest
        self.factor = factor

    def __getattr__(self, name: str) -> Any:
        return getattr(self.honest, name)

    def train(self, base: NDArrays, steps: int, batch_size: int, learning_rate: float,
              *, proximal_mu: float = 0.0) -> tuple[NDArrays, dict[str, float]] | None:
        result = self.honest.train(base, steps, batch_size, learning_rate,
                                   proximal_mu=proximal_mu)
        if result is None:
            return None
        delta, metrics = result
        return [np.multiply(d, self.factor, dtype=np.float32) for d in delta], metrics


class MaliciousWorker(Worker):
    """A worker whose trainer is wrapped in :class:`ScaledTrainer`; the protocol is honest
    (it joins, heartbeats, signs its sequence numbers), only the deltas lie."""

    def __init__(self, config: WorkerConfig, factor: float) -> None:
        super().__init__(config, trainer_factory=lambda cfg, pid: ScaledTrainer(
            build_trainer(cfg, pid), factor))
        self.factor = factor


@dataclass(frozen=True)
class Scenario:
    name: str
    strategy: str
    attacked: bool
    options: dict[str, Any] = field(default_factory=dict)

    def describe(self, args: argparse.Namespace) -> str:
        if self.strategy == "fedbuff":
            agg = self.options.get("aggregation", "mean")
            if agg == "trimmed-mean":
                agg += f" {args.trim_fraction:g}"
            return f"fedbuff K={args.buffer_k}, {agg}"
        bound = self.options.get("max_update_norm")
        return "fedasync" + (f", max-update-norm {bound:g}" if bound else "")


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    robust = {"trim_fraction": args.trim_fraction}
    return [
        Scenario("clean-fedbuff", "fedbuff", False),
        Scenario("fedbuff-mean", "fedbuff", True),
        Scenario("fedbuff-median", "fedbuff", True, {"aggregation": "median"}),
        Scenario("fedbuff-trimmed", "fedbuff", True, {"aggregation": "trimmed-mean", **robust}),
        Scenario("clean-fedasync", "fedasync", False),
        Scenario("fedasync", "fedasync", True),
        Scenario("fedasync-bounded", "fedasync", True,
                 {"max_update_norm": args.max_update_norm}),
    ]


def run(scenario: Scenario, args: argparse.Namespace) -> dict[str, Any]:
    """One federation for ``args.seconds``; its final accuracy and counts."""
    broker = f"memory://robust-{uuid.uuid4().hex[:8]}"
    shared: dict[str, Any] = {"broker": broker, "seed": args.seed,
                              "model": args.model, "data": "worker.data:load_mnist"}
    if args.data_dir:  # else DFL_DATA_DIR, read by the settings themselves
        shared["data_dir"] = args.data_dir
    def make(config: WorkerConfig) -> Worker:
        if scenario.attacked and config.party_id == MALICIOUS_PARTY:
            return MaliciousWorker(config, args.factor)
        return Worker(config)

    agg = run_federation(AggregatorConfig(
        **shared, strategy=scenario.strategy, buffer_k=args.buffer_k,
        min_parties=args.parties, max_seconds=args.seconds, local_steps=args.local_steps,
        eval_every_seconds=max(args.seconds / 3, 5.0), **scenario.options),
        [WorkerConfig(**shared, party_id=i, num_parties=args.parties)
         for i in range(args.parties)], progress=False, make_worker=make)
    last = agg.history[-1] if agg.history else None
    return {"versions": agg.status.version, "updates": agg.status.updates,
            "accuracy": None if last is None else float(last["accuracy"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.robustness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="MNIST folder (default: DFL_DATA_DIR, else Keras)")
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="wall budget per scenario, start-up included (default: 60)")
    parser.add_argument("--factor", type=float, default=-4.0,
                        help="the malicious party sends this times its honest delta "
                             "(default: -4, a scaled sign flip)")
    parser.add_argument("--parties", type=int, default=4, help="parties (default: 4)")
    parser.add_argument("--local-steps", type=int, default=50,
                        help="minibatches per update (default: 50)")
    parser.add_argument("--buffer-k", type=int, default=4, help="FedBuff's K (default: 4)")
    parser.add_argument("--trim-fraction", type=float, default=0.25,
                        help="trimmed-mean's fraction per end (default: 0.25)")
    parser.add_argument("--max-update-norm", type=float, default=3.0,
                        help="FedAsync's norm bound (default: 3; an honest delta of the CNN "
                             "at 50 steps has a global L2 norm of about 4 to 5 after the first)")
    parser.add_argument("--model", default="worker.models:mnist_cnn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", metavar="SCENARIO",
                        help="run only these scenarios (names as in the table)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # retracing notices per party

    chosen = [s for s in scenarios(args) if not args.only or s.name in args.only]
    print(f"{args.parties} parties (party {MALICIOUS_PARTY} sends {args.factor:g} x its delta "
          f"when attacked), {args.model}, {args.local_steps} local steps, IID, "
          f"{args.seconds:g} s per scenario; {os.cpu_count()} CPUs, {platform.machine()}, "
          f"Python {platform.python_version()}, numpy {np.__version__}")
    results: dict[str, dict[str, Any]] = {}
    for s in chosen:
        started = time.monotonic()
        results[s.name] = r = run(s, args)
        print(f"  {s.name}: accuracy {r['accuracy']}, version {r['versions']}, "
              f"{r['updates']} updates ({time.monotonic() - started:.0f} s)", flush=True)

    rows = []
    for s in chosen:
        r = results[s.name]
        clean = results.get(f"clean-{s.strategy}", {}).get("accuracy")
        acc = r["accuracy"]
        diff = ("" if acc is None or clean is None or not s.attacked
                else f"{100 * (acc - clean):+.1f}")
        rows.append([s.name, s.describe(args), f"x{args.factor:g}" if s.attacked else "none",
                     r["versions"], r["updates"],
                     "-" if acc is None else f"{100 * acc:.2f}", diff])
    print(tabulate(rows, headers=["scenario", "aggregation", "attack", "versions", "updates",
                                  "test accuracy %", "vs clean (points)"], tablefmt="github"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
