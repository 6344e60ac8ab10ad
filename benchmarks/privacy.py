"""What party-side differential privacy costs on MNIST with the real stack.

Every run is a fresh federation in this process over its own ``memory://`` broker: the
aggregator (FedAsync with its default settings) and ``--parties`` workers (the built-in
MNIST CNN, IID shards, the same seed, so every run starts from the same model and data).
Each run gets the same wall budget (``--seconds``, worker start-up included); the aggregator
then stops the federation and evaluates the final global model on the 10,000 test images.

The first run has no privacy and also measures the L2 norm of every clean delta the parties
send; unless ``--clip`` is given, its median is the clip norm C of the other runs. Then one
run per ``--noise`` entry: ``0`` clips only (epsilon is infinite), ``SIGMA`` > 0 clips and
adds N(0, (SIGMA*C)^2) to every coordinate. The table shows the final accuracy and its
difference to the no-privacy run of the same invocation, and each party's epsilon at
``--delta`` after the updates it sent (one step per update, see ``worker/privacy.py``).

    python -m benchmarks.privacy --data-dir DIR [--seconds 60] [--noise 0 0.01 0.03 0.1 1]

``--mode dp-sgd`` measures record-level privacy instead (``--dp-sgd``, ``worker/dpsgd.py``):
one federation per ``--runs`` entry ``EPS:Z:B`` (target epsilon per party, noise multiplier,
expected batch size), with the DP-SGD CNN (``worker.models:dp_cnn``), FedAsync's defaults
otherwise, ``--l2-clip``, ``--learning-rate`` and ``--local-steps``. Each party trains until
its next round would pass EPS (``--target-epsilon``) and leaves; once both have left, the
aggregator evaluates the final global model. The table shows the test accuracy, each party's
epsilon and steps, the wall time and the per-example gradients per second of the run.

    python -m benchmarks.privacy --mode dp-sgd --data-dir DIR [--runs 1.2:2.0:500 ...]

MNIST comes from ``--data-dir`` or ``DFL_DATA_DIR`` (else Keras's cache, downloading once).
The noise is drawn from fresh entropy, as in a real party, so runs are not bit-reproducible.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tabulate import tabulate

from aggregator import Aggregator, AggregatorConfig
from deploy.launcher import run_federation
from messages.types import NDArrays
from worker import Worker, WorkerConfig
from worker.accounting import StepLedger
from worker.trainers import build_trainer

if TYPE_CHECKING:
    from worker.trainers import Trainer


class NormRecorder:
    """A party's :class:`~worker.training.LocalTrainer` that notes the L2 norm (over all
    tensors) of every clean delta before the worker clips and noises it; nothing else
    changes."""

    def __init__(self, honest: Trainer, norms: list[float]) -> None:
        self.honest = honest
        self.norms = norms

    def __getattr__(self, name: str) -> Any:
        return getattr(self.honest, name)

    def train(self, base: NDArrays, steps: int, batch_size: int, learning_rate: float,
              *, proximal_mu: float = 0.0) -> tuple[NDArrays, dict[str, float]] | None:
        result = self.honest.train(base, steps, batch_size, learning_rate,
                                   proximal_mu=proximal_mu)
        if result is not None:
            delta = result[0]
            self.norms.append(math.sqrt(sum(float(np.dot(d.ravel(), d.ravel()))
                                            for d in delta)))
        return result


class RecordingWorker(Worker):
    def __init__(self, config: WorkerConfig, norms: list[float]) -> None:
        super().__init__(config, trainer_factory=lambda cfg, pid: NormRecorder(
            build_trainer(cfg, pid), norms))
        self.norms = norms


def run(args: argparse.Namespace, clip: float | None, sigma: float) -> dict[str, Any]:
    """One federation for ``args.seconds``; its final accuracy, counts, norms and epsilons."""
    broker = f"memory://privacy-{uuid.uuid4().hex[:8]}"
    shared: dict[str, Any] = {"broker": broker, "seed": args.seed,
                              "model": args.model, "data": "worker.data:load_mnist"}
    if args.data_dir:  # else DFL_DATA_DIR, read by the settings themselves
        shared["data_dir"] = args.data_dir
    privacy: dict[str, Any] = ({} if clip is None else
                               {"dp_clip": clip, "dp_noise": sigma, "dp_delta": args.delta})
    norms: list[float] = []  # the parties' training threads share it
    workers: list[Worker] = []

    def make(config: WorkerConfig) -> Worker:
        workers.append(RecordingWorker(config, norms))
        return workers[-1]

    agg = run_federation(AggregatorConfig(
        **shared, min_parties=args.parties, max_seconds=args.seconds,
        eval_every_seconds=max(args.seconds / 3, 5.0)),
        [WorkerConfig(**shared, **privacy, party_id=i, num_parties=args.parties)
         for i in range(args.parties)], progress=False, make_worker=make)
    last = agg.history[-1] if agg.history else None
    return {"versions": agg.status.version, "updates": agg.status.updates,
            "accuracy": None if last is None else float(last["accuracy"]),
            "params": sum(int(w.size) for w in agg.weights), "norms": norms,
            "sent": [w.stats.updates_sent for w in workers],
            "epsilon": [w.stats.epsilon for w in workers]}


def run_dp_sgd(args: argparse.Namespace, target: float, z: float, batch: int
               ) -> dict[str, Any]:
    """One DP-SGD federation until both parties spent ``target``; accuracy, epsilon, time."""
    broker = f"memory://privacy-{uuid.uuid4().hex[:8]}"
    shared: dict[str, Any] = {"broker": broker, "seed": args.seed, "model": args.model,
                              "data": "worker.data:load_mnist"}
    if args.data_dir:
        shared["data_dir"] = args.data_dir
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dfl-dp-sgd-") as state:
        agg = Aggregator(AggregatorConfig(
            **shared, min_parties=args.parties, max_seconds=args.seconds,
            local_steps=args.local_steps, batch_size=batch, learning_rate=args.learning_rate,
            eval_every_seconds=max(args.seconds / 5, 30.0))).start()
        workers = [Worker(WorkerConfig(**shared, party_id=i, num_parties=args.parties,
                                       dp_sgd=True, noise_multiplier=z, l2_clip=args.l2_clip,
                                       target_epsilon=target, dp_delta=args.delta,
                                       state_dir=state)).start()
                   for i in range(args.parties)]
        try:
            for w in workers:  # each leaves once its next round would pass the target
                w.wait(args.seconds + 120)
            sent = sum(w.stats.updates_sent for w in workers)
            deadline = time.monotonic() + 60
            while agg.status.updates < sent and time.monotonic() < deadline:
                time.sleep(0.2)  # the last updates are still in the queue
        finally:
            agg.stop("every party spent its budget")
            agg.wait(900)
            for w in workers:
                w.stop()
                w.wait(60)
        steps = [StepLedger(Path(state) / f"party-{i}").steps for i in range(args.parties)]
    last = agg.history[-1] if agg.history else None
    return {"accuracy": None if last is None else float(last["accuracy"]),
            "versions": agg.status.version, "updates": agg.status.updates,
            "sent": [w.stats.updates_sent for w in workers],
            "epsilon": [w.stats.epsilon for w in workers], "steps": steps,
            "stopped": [w.stats.stopped_by for w in workers],
            "seconds": time.monotonic() - started}


def dp_sgd_main(args: argparse.Namespace) -> int:
    """``--mode dp-sgd``: one federation per ``--runs`` entry, then the table."""
    defaults = AggregatorConfig(broker="memory://", evaluate=False)
    print(f"DP-SGD: {args.parties} parties, {args.model}, FedAsync (alpha "
          f"{defaults.mixing_alpha}, {defaults.staleness} staleness), IID, {args.local_steps} "
          f"local steps, lr {args.learning_rate}, clip {args.l2_clip}, delta {args.delta:g}; "
          f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}",
          flush=True)
    rows: list[list[Any]] = []
    for spec in args.runs:
        target, z, batch = (float(v) for v in spec.split(":"))
        r = run_dp_sgd(args, target, z, int(batch))
        examples = sum(r["steps"]) * batch
        row = [f"{target:g}", f"{z:g}", f"{int(batch)}",
               "/".join(map(str, r["steps"])), "/".join(map(str, r["sent"])),
               show_epsilon(r["epsilon"]),
               "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}",
               f"{r['seconds']:.0f}", f"{examples / r['seconds']:.0f}"]
        rows.append(row)
        print("  " + " | ".join(row) + f" ({r['stopped'][0] or 'not stopped'})", flush=True)
    print(tabulate(rows, headers=["target epsilon", "noise Z", "batch B", "steps per party",
                                  "updates per party", f"epsilon per party (delta {args.delta:g})",
                                  "test accuracy %", "wall s", "examples/s"],
                   tablefmt="github", disable_numparse=True))
    return 0


def describe_norms(norms: list[float]) -> str:
    if not norms:
        return "no deltas recorded"
    a = np.asarray(norms)
    return (f"{len(a)} deltas: min {a.min():.3g}, median {np.median(a):.3g}, "
            f"90th percentile {np.percentile(a, 90):.3g}, max {a.max():.3g} "
            f"(first {a[0]:.3g})")


def show_epsilon(values: list[float]) -> str:
    return " / ".join("inf" if math.isinf(e) else f"{e:.3g}" for e in values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.privacy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="MNIST folder (default: DFL_DATA_DIR, else Keras)")
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="wall budget per run, start-up included (default: 60)")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.01, 0.03, 0.1, 1.0],
                        metavar="SIGMA",
                        help="noise multipliers after the no-privacy run; 0 clips only "
                             "(default: 0 0.01 0.03 0.1 1)")
    parser.add_argument("--clip", type=float,
                        help="clip norm C (default: the median clean delta norm of the "
                             "no-privacy run)")
    parser.add_argument("--delta", type=float, default=1e-5,
                        help="delta of the reported epsilon (default: 1e-5)")
    parser.add_argument("--parties", type=int, default=2, help="parties (default: 2)")
    parser.add_argument("--model", help="default: worker.models:mnist_cnn, or dp_cnn with "
                                            "--mode dp-sgd")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=("party", "dp-sgd"), default="party",
                        help="party: --dp-clip/--dp-noise on each update (default); dp-sgd: "
                             "record-level DP-SGD inside each party")
    dp = parser.add_argument_group("--mode dp-sgd")
    dp.add_argument("--runs", nargs="+", default=["1.2:2.0:500", "3:1.3:500", "8:0.8:500"],
                    metavar="EPS:Z:B", help="target epsilon, noise multiplier and expected "
                                             "batch size of each run (default: 1.2:2.0:500 "
                                             "3:1.3:500 8:0.8:500)")
    dp.add_argument("--l2-clip", type=float, default=1.0, help="default: 1.0")
    dp.add_argument("--learning-rate", type=float, default=1.0, help="default: 1.0")
    dp.add_argument("--local-steps", type=int, default=50, help="default: 50")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # retracing notices per party
    logging.getLogger("absl").setLevel(logging.ERROR)  # RDP orders that do not converge
    if args.mode == "dp-sgd":
        args.model = args.model or "worker.models:dp_cnn"
        if args.seconds == parser.get_default("seconds"):
            args.seconds = 600.0  # a cap: each run ends when the budgets are spent
        return dp_sgd_main(args)
    args.model = args.model or "worker.models:mnist_cnn"

    defaults = AggregatorConfig(broker="memory://", evaluate=False)
    print(f"{args.parties} parties, {args.model}, FedAsync defaults (alpha "
          f"{defaults.mixing_alpha}, {defaults.staleness} staleness, {defaults.local_steps} "
          f"local steps of {defaults.batch_size}, lr {defaults.learning_rate}), IID, "
          f"{args.seconds:g} s per run; {os.cpu_count()} CPUs, {platform.machine()}, "
          f"Python {platform.python_version()}, numpy {np.__version__}", flush=True)

    started = time.monotonic()
    baseline = run(args, None, 0.0)
    print(f"  no DP: accuracy {baseline['accuracy']}, version {baseline['versions']}, "
          f"{baseline['updates']} updates ({time.monotonic() - started:.0f} s)", flush=True)
    print(f"  clean delta L2 norms: {describe_norms(baseline['norms'])}", flush=True)
    if args.clip is not None:
        clip = args.clip
    elif baseline["norms"]:
        clip = float(f"{np.median(baseline['norms']):.2g}")  # a round number near the median
    else:
        parser.error("the no-privacy run sent no update to measure; give --clip")
    print(f"  clip norm C = {clip:g}" + ("" if args.clip is not None else
                                          " (the median clean norm, rounded)"), flush=True)

    results: list[tuple[float, dict[str, Any]]] = []
    for sigma in args.noise:
        started = time.monotonic()
        r = run(args, clip, sigma)
        results.append((sigma, r))
        print(f"  sigma {sigma:g}: accuracy {r['accuracy']}, version {r['versions']}, "
              f"{r['updates']} updates, epsilon {show_epsilon(r['epsilon'])}, clean norms "
              f"{describe_norms(r['norms'])} ({time.monotonic() - started:.0f} s)", flush=True)

    clean = baseline["accuracy"]
    root_d = math.sqrt(baseline["params"])

    def accuracy(r: dict[str, Any]) -> str:
        return "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}"

    rows: list[list[Any]] = [["no DP", "-", "-", "-", "-", baseline["updates"],
                              "/".join(map(str, baseline["sent"])), accuracy(baseline), "",
                              "-"]]
    for sigma, r in results:
        diff = ("" if r["accuracy"] is None or clean is None
                else f"{100 * (r['accuracy'] - clean):+.1f}")
        clipped = (f"{100 * np.mean(np.asarray(r['norms']) > clip):.0f}" if r["norms"]
                   else "-")
        rows.append(["clip only" if sigma == 0 else f"sigma {sigma:g}", f"{clip:g}",
                     f"{sigma * clip:.3g}", f"{sigma * root_d:.3g}", clipped, r["updates"],
                     "/".join(map(str, r["sent"])), accuracy(r), diff,
                     show_epsilon(r["epsilon"])])
    print(tabulate(rows, headers=["run", "clip C", "noise std", "noise norm / C", "clipped %",
                                  "updates", "sent per party", "test accuracy %",
                                  "vs no DP (points)", f"epsilon per party (delta {args.delta:g})"],
                   tablefmt="github", disable_numparse=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
