"""Time to accuracy: asynchronous against synchronous federated training, and against
centralized training, on MNIST with the built-in CNN, all measured in one invocation.

Each scenario runs in a fresh Python process (no TensorFlow state carried between runs):
an aggregator and its parties on the embedded ``memory://`` broker, exactly as ``dfl run``
runs them, for ``--seconds`` of training (so the final accuracy after that budget can be
compared; the time to 98.0% test accuracy is read off the curve). The same stack, broker,
model, optimizer (Adam 1e-3), batch size (32), local steps (100) and evaluation cadence
(every 5 s on the 10k test images) serve every strategy; only ``--strategy`` changes.

Fairness on 2 shared cores: every party's training competes for the same CPU, so a
straggler is *simulated* (``--slowdown``, ``--slowdown-sigma``): after each round it sleeps
(s - 1) times the round's measured training time. Sleeping takes no CPU, so the straggler
does not slow the others, as a slow machine elsewhere would not. Time counts from the
release of model version 0 (the version-0 evaluation), so TensorFlow's start-up in the
parties is not counted; the centralized baseline counts from the start of ``fit`` and
pauses its clock while it evaluates (every 1/8 epoch), which favours it.

    python -m benchmarks.time_to_accuracy --data-dir DIR [--seconds 180] [--seeds 0 1 2]
        [--only iid-straggler-fedasync iid-straggler-fedasync:a1-const ...] [--png PNG]

Each scenario runs once per seed (data partition, model initialisation, straggler draws);
the table gives the median time to 98% and the mean final accuracy over the seeds, since
one run's crossing of 98% moves by tens of seconds between seeds. ``NAME:TAG`` runs a
scenario with one of the tuning ``VARIANTS`` of its strategy's options.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TARGET = 0.98
COLORS = {"centralized": "C0", "fedasync": "C1", "fedbuff": "C2", "fedavg": "C3"}


@dataclass(frozen=True)
class Scenario:
    name: str
    partition: str = "iid"
    parties: int = 4
    strategy: str = "fedasync"
    slowdowns: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    sigma: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)
    alpha: float = 0.5  # Dirichlet concentration of the label skew
    data: str = "worker.data:load_mnist"


PARTITIONS = {"iid": ("iid", 0.5), "dirichlet": ("dirichlet", 0.5),
              "dirichlet0.1": ("dirichlet", 0.1)}
"""Scenario name prefix: (partition scheme, Dirichlet alpha)."""
TARGETS = {"worker.data:load_mnist": 0.98, "worker.data:load_fashion_mnist": 0.88}
"""The accuracy whose time is measured, per data set."""


STRATEGY_OPTIONS: dict[str, dict[str, Any]] = {
    # Chosen by runs of the VARIANTS below (benchmarks/RESULTS.md, "Tuning"): FedAsync
    # alpha 0.6 with polynomial staleness a=0.5 (the defaults; alpha 1 diverges, a0.8-poly1
    # was no better); FedBuff K=3 of 4 parties (K=4 was slower, K=2 oscillates at eta 1)
    "fedasync": {"staleness": "polynomial", "staleness_a": 0.5, "mixing_alpha": 0.6},
    "fedbuff": {"staleness": "polynomial", "staleness_a": 0.5, "buffer_k": 3},
    "fedavg": {},
}

VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    # tuning candidates: ``--only SCENARIO:TAG`` runs SCENARIO with these options instead
    "fedasync": {
        "a0.6-poly0.5": {"staleness": "polynomial", "staleness_a": 0.5, "mixing_alpha": 0.6},
        "a1-poly0.5": {"staleness": "polynomial", "staleness_a": 0.5, "mixing_alpha": 1.0},
        "a1-const": {"staleness": "constant", "mixing_alpha": 1.0},
        "a1-hinge": {"staleness": "hinge", "staleness_a": 0.5, "staleness_b": 4,
                     "mixing_alpha": 1.0},
        "a0.8-poly1": {"staleness": "polynomial", "staleness_a": 1.0, "mixing_alpha": 0.8},
    },
    "fedbuff": {
        "k2-eta1": {"staleness": "polynomial", "staleness_a": 0.5, "buffer_k": 2},
        "k3-eta1": {"staleness": "polynomial", "staleness_a": 0.5, "buffer_k": 3},
        "k4-eta1": {"staleness": "polynomial", "staleness_a": 0.5, "buffer_k": 4},
        "k2-eta2": {"staleness": "polynomial", "staleness_a": 0.5, "buffer_k": 2, "eta": 2.0},
        # server optimizers (aggregator/strategies/optimizers.py)
        "momentum": {"staleness": "polynomial", "staleness_a": 0.5, "buffer_k": 3,
                     "eta": 0.5, "server_optimizer": "momentum", "server_beta1": 0.5},
        "adam": {"staleness": "polynomial", "staleness_a": 0.5, "buffer_k": 3, "eta": 0.003,
                 "server_optimizer": "adam"},
        "yogi": {"staleness": "polynomial", "staleness_a": 0.5, "buffer_k": 3, "eta": 0.003,
                 "server_optimizer": "yogi"},
        "fadas": {"staleness": "polynomial", "staleness_a": 0.5, "buffer_k": 3, "eta": 0.003,
                  "server_optimizer": "adam", "server_staleness_threshold": 2},
    },
}
VARIANTS["fedasync"].update({
    "momentum": {"staleness": "polynomial", "staleness_a": 0.5, "mixing_alpha": 0.3,
                 "server_optimizer": "momentum", "server_beta1": 0.5},
    "adam": {"staleness": "polynomial", "staleness_a": 0.5, "mixing_alpha": 0.002,
             "server_optimizer": "adam"},
})
VARIANTS["fedavg"] = {
    "adam": {"eta": 0.003, "server_optimizer": "adam"},
    "momentum": {"eta": 0.5, "server_optimizer": "momentum", "server_beta1": 0.5},
}



def scenarios() -> list[Scenario]:
    out = []
    for data, prefix in (("worker.data:load_mnist", ""),
                         ("worker.data:load_fashion_mnist", "fashion-")):
        for name, (partition, alpha) in PARTITIONS.items():
            for speed, slowdowns, sigma in (("equal", (1.0,) * 4, 0.0),
                                            ("straggler", (1.0, 1.0, 1.0, 4.0), 0.0),
                                            ("lognormal", (1.0,) * 4, 1.0)):
                for strategy in ("fedasync", "fedbuff", "fedavg"):
                    out.append(Scenario(f"{prefix}{name}-{speed}-{strategy}", partition, 4,
                                        strategy, slowdowns, sigma, STRATEGY_OPTIONS[strategy],
                                        alpha, data))
    out.append(Scenario("iid-2equal-fedasync", "iid", 2, "fedasync", (1.0, 1.0), 0.0,
                        STRATEGY_OPTIONS["fedasync"]))
    return out


def scenario(name: str) -> Scenario:
    """A scenario by name; ``NAME:TAG`` is NAME with the options of variant TAG."""
    base, _, tag = name.partition(":")
    s = next(s for s in scenarios() if s.name == base)
    if not tag:
        return s
    return dataclasses.replace(s, name=name, options=VARIANTS[s.strategy][tag])


def target_of(name: str) -> float:
    """The accuracy a scenario's time is measured to (88% for Fashion-MNIST, else 98%)."""
    return TARGETS["worker.data:load_fashion_mnist"] if name.startswith("fashion-") \
        else TARGET


def known_names() -> set[str]:
    names = {"centralized", "fashion-centralized"}
    for s in scenarios():
        names.add(s.name)
        names.update(f"{s.name}:{tag}" for tag in VARIANTS.get(s.strategy, {}))
    return names


# -- one run, in its own process ---------------------------------------------------------
def run_federated(s: Scenario, data_dir: str | None, seconds: float, seed: int
                  ) -> dict[str, Any]:
    from aggregator import Aggregator, AggregatorConfig
    from worker import Worker, WorkerConfig

    broker = f"memory://{s.name.replace(':', '-')}"
    agg = Aggregator(AggregatorConfig(
        broker=broker, strategy=s.strategy, min_parties=s.parties, data_dir=data_dir,
        data=s.data, eval_every_seconds=5.0, seed=seed, **s.options)).start()
    workers = [Worker(WorkerConfig(
        broker=broker, party_id=i, num_parties=s.parties, partition=s.partition,
        alpha=s.alpha, data=s.data, data_dir=data_dir, seed=seed, slowdown=s.slowdowns[i],
        slowdown_sigma=s.sigma)).start()
        for i in range(s.parties)]
    released = None
    deadline = None
    while not agg.wait(0.5):
        history = agg.history
        if released is None and history:
            released = history[0]["time"]
            deadline = time.monotonic() + seconds
        if deadline is not None and time.monotonic() > deadline:
            agg.stop("wall budget spent")
    for w in workers:
        w.stop()
        w.wait(60)
    start = released if released is not None else 0.0
    curve = [(r["time"] - start, r["accuracy"], r["version"]) for r in agg.history]
    return {"curve": curve, "updates": agg.status.updates,
            "sent": [w.stats.updates_sent for w in workers]}


def run_centralized(data_dir: str | None, seconds: float, seed: int,
                    data_plugin: str = "worker.data:load_mnist") -> dict[str, Any]:
    """Keras fit of the same CNN on all 60k images, evaluated every 1/8 epoch."""
    import keras

    from messages.daemon.plugins import build_model, load_dataset

    data = load_dataset(data_plugin, data_dir)
    model = build_model("worker.models:mnist_cnn", seed)
    every = len(data.y_train) // 32 // 8
    curve: list[tuple[float, float, int]] = []

    class Clock(keras.callbacks.Callback):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.paused = 0.0
            self.started = time.perf_counter()
            self.batches = 0

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.batches += 1
            if self.batches % every:
                return
            t = time.perf_counter() - self.started - self.paused
            before = time.perf_counter()
            scores = self.model.evaluate(data.x_test, data.y_test, batch_size=500, verbose=0,
                                         return_dict=True)
            self.paused += time.perf_counter() - before
            curve.append((t, float(scores["accuracy"]), self.batches))
            if t > seconds:
                self.model.stop_training = True

    model.fit(data.x_train, data.y_train, batch_size=32, epochs=20, shuffle=True, verbose=0,
              callbacks=[Clock()])
    return {"curve": curve, "updates": 0, "sent": []}


def child(name: str, data_dir: str | None, seconds: float, seed: int, out: str) -> None:
    if name == "centralized":
        result = run_centralized(data_dir, seconds, seed)
    elif name == "fashion-centralized":
        result = run_centralized(data_dir, seconds, seed, "worker.data:load_fashion_mnist")
    else:
        result = run_federated(scenario(name), data_dir, seconds, seed)
    Path(out).write_text(json.dumps({**result, "seconds": seconds, "seed": seed}))


# -- the suite ---------------------------------------------------------------------------
def run_key(name: str, seed: int) -> str:
    return f"{name}@{seed}"


def one_run(name: str, result: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Time to 98% and the accuracy after the run's own budget (``seconds`` if unrecorded)."""
    seconds = result.get("seconds", seconds)
    curve = result["curve"]
    reached = next((t for t, acc, _ in curve if acc >= target_of(name)), None)
    within = [acc for t, acc, _ in curve if t <= seconds]
    return {"scenario": name, "time_to_98": reached, "budget": seconds,
            "final_accuracy": within[-1] if within else None,
            "versions": curve[-1][2] if curve else 0, "updates": result["updates"]}


def summarize(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for a scenario over its seeds: the median time to 98% (a run that never got
    there counts as slower than any that did; the median is ``None`` when most did not) and
    the mean final accuracy after the budget."""
    times = sorted(r["time_to_98"] if r["time_to_98"] is not None else math.inf for r in runs)
    middle = statistics.median(times) if times else math.inf
    finals = [r["final_accuracy"] for r in runs if r["final_accuracy"] is not None]
    return {"scenario": name, "seeds": len(runs),
            "budget_s": "/".join(sorted({f"{r['budget']:.0f}" for r in runs})),
            "time_to_98": None if math.isinf(middle) else round(middle, 1),
            "times": " ".join("-" if math.isinf(t) else f"{t:.0f}" for t in times),
            "final_accuracy": round(100 * statistics.fmean(finals), 2) if finals else None,
            "final_range": (f"{100 * min(finals):.2f}-{100 * max(finals):.2f}" if finals
                            else None),
            "updates": round(statistics.fmean(r["updates"] for r in runs)) if runs else 0}


def table(results: dict[str, dict[str, Any]], seconds: float) -> list[dict[str, Any]]:
    """A row per scenario with its ratios against sync FedAvg (same partition and speeds)
    and against centralized training."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for key, result in results.items():
        name = key.rsplit("@", 1)[0]
        by_name.setdefault(name, []).append(one_run(name, result, seconds))
    rows = {name: summarize(name, runs) for name, runs in sorted(by_name.items())}
    for name, r in rows.items():
        prefix = name.partition(":")[0].rsplit("-", 1)[0]
        central = "fashion-centralized" if name.startswith("fashion-") else "centralized"
        for column, other in (("vs_fedavg", rows.get(prefix + "-fedavg")),
                              ("vs_centralized", rows.get(central))):
            r[column] = (round(r["time_to_98"] / other["time_to_98"], 2)
                         if other and r["time_to_98"] and other["time_to_98"] else None)
    return list(rows.values())


def plot(results: dict[str, dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {key.rsplit("@", 1)[0] for key in results}
    groups = sorted({n.rsplit("-", 1)[0] for n in names if not n.endswith("centralized")})
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(5 * max(len(groups), 1), 4),
                             squeeze=False)
    for ax, group in zip(axes[0], groups, strict=False):
        labelled = set()
        for key, result in sorted(results.items()):
            name = key.rsplit("@", 1)[0]
            central = "fashion-centralized" if group.startswith("fashion-") else "centralized"
            if not (name.startswith(group + "-") or name == central):
                continue
            label = name.removeprefix(group + "-")
            color = COLORS.get(label.partition(":")[0])  # a strategy's, whatever its variant
            ax.plot([t for t, _, _ in result["curve"]],
                    [acc * 100 for _, acc, _ in result["curve"]],
                    label=None if label in labelled else label, color=color,
                    linewidth=1, alpha=0.8,
                    linestyle="--" if name.endswith("centralized") else "-")
            labelled.add(label)
        target = target_of(group)
        ax.axhline(target * 100, color="grey", linewidth=0.5)
        ax.set_title(group)
        ax.set_xlabel("wall time since training started (s)")
        ax.set_ylim(target * 100 - 8, target * 100 + 2)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("test accuracy (%) (one line per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("DFL_DATA_DIR"))
    p.add_argument("--seconds", type=float, default=180.0,
                   help="wall budget of training per run (default 180)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="one run per seed and scenario; the table gives medians (default 0)")
    p.add_argument("--only", nargs="*", help="scenario names (default: all, and centralized)")
    p.add_argument("--png", default="benchmarks/time_to_accuracy.png")
    p.add_argument("--json", default="benchmarks/time_to_accuracy.json",
                   help="raw curves, so a later run can add scenarios (--only) to them")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.child:
        child(ns.child, ns.data_dir, ns.seconds, ns.seed, ns.out)
        return 0
    names = ns.only or ["centralized", *(s.name for s in scenarios())]
    known = known_names()
    if unknown := [n for n in names if n not in known]:
        p.error(f"unknown scenario {unknown[0]!r}; known: {', '.join(sorted(known))}")
    results: dict[str, dict[str, Any]] = {}
    if Path(ns.json).exists():
        results = json.loads(Path(ns.json).read_text())
    for seed in ns.seeds:  # seeds outermost: an interrupted run still has every scenario once
        for name in names:
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                began = time.monotonic()
                cmd = [sys.executable, "-m", "benchmarks.time_to_accuracy", "--child", name,
                       "--seconds", str(ns.seconds), "--seed", str(seed), "--out", out.name]
                if ns.data_dir:
                    cmd += ["--data-dir", ns.data_dir]
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL,
                               env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
                results[run_key(name, seed)] = json.loads(Path(out.name).read_text())
            row = one_run(name, results[run_key(name, seed)], ns.seconds)
            print(f"{name} seed {seed}: 98% at {row['time_to_98']} s, final "
                  f"{row['final_accuracy']} ({time.monotonic() - began:.0f} s)", flush=True)
            Path(ns.json).write_text(json.dumps(results))
    from tabulate import tabulate

    print(tabulate(table(results, ns.seconds), headers="keys", floatfmt=".4g",
                   tablefmt="github"))
    plot(results, ns.png)
    print(f"plot: {ns.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
