"""What secure aggregation costs: FedBuff with and without it, in the same run.

Federations in this process over their own ``memory://`` broker, one after the other, with
the same seed, data, model and budget: FedBuff (mean, ``--buffer-k``) with ``--parties``
parties, and the same with ``--secure-aggregation`` (signed keys made in a temporary folder,
a helper on its own thread). Each stops at ``--target`` accuracy or after ``--seconds``.
``--repeat`` pairs run in the order plain, secure, secure, plain, ... so that a drift of the
machine's speed during the benchmark weighs on both alike; one run's crossing of the target
moves by tens of seconds from run to run, so medians are compared.

Printed: per run and as medians, wall time to ``--target`` (from the evaluation of model
version 0, so start-up is not counted) and its ratio, final accuracy and the difference,
updates applied, bytes of one update body on the wire
(the encoded ``Update`` of the model's delta, plain float32 against masked uint32 with its
sealed seed and signature), the helper's CPU time per update (its thread's CPU, measured in
the helper), and exactness: ``--buffer-k`` synthetic deltas of the model's size are masked as
parties mask them, unmasked as the leader does with the helper's sum, and the largest
difference to the plain weighted mean of the same clipped deltas is compared with the bound
``1/scale``.

    python -m benchmarks.secure_aggregation --data-dir DIR [--seconds 240] [--parties 3]

MNIST comes from ``--data-dir`` or ``DFL_DATA_DIR``.
"""

from __future__ import annotations

import argparse
import math
import platform
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from tabulate import tabulate

from aggregator import AggregatorConfig
from aggregator.helper.config import HelperConfig
from aggregator.helper.service import Helper
from aggregator.staleness import make_staleness
from aggregator.strategies.base import Contribution
from aggregator.strategies.secure import SecureFedBuff
from deploy.launcher import run_federation
from messages.secagg import sealing
from messages.secagg.masks import mask_sum
from messages.secagg.quantize import clip_l2
from messages.secagg.sealing import SealedSeed
from messages.wire.codec import encode
from messages.wire.kinds import Update
from messages.wire.signing import AGGREGATOR, HELPER, load_signer, make_ed25519
from worker import WorkerConfig
from worker.pipeline import MaskingStage, Outgoing


def make_keys(root: Path, parties: int) -> tuple[Path, Path]:
    """The leader's key folder and the helper's own, as `dfl admin` would lay them out."""
    leader, helper = root / "leader", root / "helper"
    make_ed25519(leader, AGGREGATOR)
    make_ed25519(helper, HELPER)
    for i in range(parties):
        make_ed25519(leader, str(i))
        shutil.copy(leader / f"{i}.pub", helper)
    shutil.copy(leader / f"{AGGREGATOR}.pub", helper)
    shutil.copy(helper / f"{HELPER}.pub", leader)
    sealing.make_seal_keys(helper)
    return leader, helper


def federation(args: argparse.Namespace, secure: bool, keys: tuple[Path, Path] | None
               ) -> dict[str, Any]:
    """One federation until the target or the budget; its timings and counts."""
    shared: dict[str, Any] = {"broker": f"memory://secagg-{uuid.uuid4().hex[:8]}",
                              "seed": args.seed, "federation": "mnist"}
    if args.data_dir:
        shared["data_dir"] = args.data_dir
    agg_extra: dict[str, Any] = {}
    worker_extra: list[dict[str, Any]] = [{} for _ in range(args.parties)]
    helper = None
    if secure:
        assert keys is not None
        leader, helper_keys = keys
        agg_extra = {"secure_aggregation": True, "keys_dir": str(leader)}
        worker_extra = [{"signing_key": str(leader / f"{i}.key"),
                         "aggregator_key": str(leader / f"{AGGREGATOR}.pub"),
                         "helper_key": str(helper_keys / sealing.SEAL_PUBLIC)}
                        for i in range(args.parties)]
        helper = Helper(HelperConfig(**shared, seal_key=str(helper_keys / sealing.SEAL_KEY),
                                     party_keys=str(helper_keys),
                                     # a fresh helper for a fresh federation: a
                                     # helper's state refuses seqs it answered before
                                     state_dir=str(helper_keys.parent / uuid.uuid4().hex)
                                     )).start()
    began = time.monotonic()
    try:
        agg = run_federation(AggregatorConfig(
            **shared, **agg_extra, strategy="fedbuff", buffer_k=args.buffer_k,
            min_parties=args.parties, target_accuracy=args.target, max_seconds=args.seconds,
            eval_every_seconds=args.eval_every),
            [WorkerConfig(**shared, **worker_extra[i], party_id=i, num_parties=args.parties)
             for i in range(args.parties)], progress=False)
    finally:
        if helper is not None:
            helper.stop()
            helper.wait(30)
    wall = time.monotonic() - began
    start = agg.history[0]["time"] if agg.history else 0.0
    reached = next((r["time"] - start for r in agg.history if r["accuracy"] >= args.target),
                   None)
    last = agg.history[-1] if agg.history else None
    parties = list(agg.membership.parties.values())
    staleness = (sum(p.mean_staleness * p.updates for p in parties)
                 / max(sum(p.updates for p in parties), 1))
    out: dict[str, Any] = {"time": reached, "accuracy": None if last is None else last["accuracy"],
                           "updates": agg.status.updates, "versions": agg.status.version,
                           "discarded": agg.status.discarded, "staleness": staleness,
                           "wall": wall, "weights": agg.weights}
    if helper is not None:
        out["helper_ms_per_update"] = 1000 * helper.stats.cpu_seconds / max(helper.stats.updates, 1)
        out["helper_refused"] = sum(helper.stats.refused.values())
    return out


def update_bytes(weights: list[np.ndarray], keys: tuple[Path, Path], k: int) -> tuple[int, int]:
    """Bytes of one plain and one masked update body of this model's delta."""
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": rng.normal(0, 0.01, w.shape).astype(np.float32)
               for i, w in enumerate(weights)}
    plain = encode(Update("0", 1, 0, 100, tensors))
    leader, helper = keys
    stage = MaskingStage(sealing.load_seal_public(helper / sealing.SEAL_PUBLIC),
                         load_signer(leader / "0.key", "0"), "mnist", "0")
    settings = AggregatorConfig(strategy="fedbuff", buffer_k=k, secure_aggregation=True,
                                broker="memory://x", evaluate=False).settings()
    out = stage(Outgoing(tensors, {}, seq=1, settings=settings))
    masked = encode(Update("0", 1, 0, 100, out.tensors, out.metrics,
                           sealed_seed=out.sealed_seed, seed_signature=out.seed_signature))
    return len(plain), len(masked)


def exactness(weights: list[np.ndarray], keys: tuple[Path, Path], k: int
              ) -> tuple[float, float]:
    """The largest error of the unmasked weighted mean of ``k`` masked deltas against the
    plain weighted mean of the same clipped deltas, and the bound ``1/scale``."""
    leader, helper = keys
    seal_key = sealing.load_seal_private(helper / sealing.SEAL_KEY)
    config = AggregatorConfig(strategy="fedbuff", buffer_k=k, secure_aggregation=True,
                              broker="memory://x", evaluate=False, staleness="constant")
    settings = config.settings()
    strategy = SecureFedBuff(make_staleness("constant"), k, 1.0, config.secagg_clip,
                             config.secagg_max_weight)
    rng = np.random.default_rng(1)
    zero = [np.zeros_like(w) for w in weights]
    clipped_all = []
    for i in range(k):
        delta = [rng.normal(0, 0.01, w.shape).astype(np.float32) for w in weights]
        clipped_all.append(clip_l2(delta, config.secagg_clip)[0])
        party = str(i)
        stage = MaskingStage(sealing.load_seal_public(helper / sealing.SEAL_PUBLIC),
                             load_signer(leader / f"{party}.key", party), "mnist", party)
        out = stage(Outgoing({f"t{j}": d for j, d in enumerate(delta)}, {}, seq=1,
                             settings=settings))
        strategy.offer(zero, Contribution(party, list(out.tensors.values()),
                                          int(rng.integers(500, 20000)), 0,
                                          sealed=SealedSeed(1, out.sealed_seed,
                                                            out.seed_signature)))
    (request,) = strategy.take_requests()
    seeds = [sealing.open_sealed(s, seal_key, "mnist", p, q)
             for p, q, s in zip(request.parties, request.seqs, request.sealed, strict=True)]
    strategy.unmask(zero, request.request, mask_sum(seeds, request.weights, request.length))
    # the plain mean with the integer weights the leader used (what the mask sum encodes)
    total = sum(request.weights)
    plain = [sum(w * c[j] for w, c in zip(request.weights, clipped_all, strict=True)) / total
             for j in range(len(weights))]
    error = max(float(np.max(np.abs(z - p))) for z, p in zip(zero, plain, strict=True))
    return error, 1 / strategy.scale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.secure_aggregation",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="MNIST folder (else DFL_DATA_DIR or Keras's cache)")
    parser.add_argument("--parties", type=int, default=3)
    parser.add_argument("--buffer-k", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=240.0, help="budget of each run")
    parser.add_argument("--target", type=float, default=0.98)
    parser.add_argument("--eval-every", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each (default 3)")
    args = parser.parse_args(argv)
    runs: dict[str, list[dict[str, Any]]] = {"fedbuff": [], "fedbuff + secure": []}
    with tempfile.TemporaryDirectory() as tmp:
        keys = make_keys(Path(tmp), args.parties)
        for i in range(args.repeat):
            order = (False, True) if i % 2 == 0 else (True, False)
            for secure in order:
                r = federation(args, secure, keys if secure else None)
                runs["fedbuff + secure" if secure else "fedbuff"].append(r)
                print(f"{'secure' if secure else 'plain '} run {i}: {show(r['time'])} s to "
                      f"{args.target}, final {show(r['accuracy'], '.4f')}, {r['versions']} "
                      f"versions, {r['updates']} updates ({r['discarded']} discarded), mean "
                      f"staleness {r['staleness']:.2f}", flush=True)
        weights = runs["fedbuff"][0]["weights"]
        plain_bytes, masked_bytes = update_bytes(weights, keys, args.buffer_k)
        error, bound = exactness(weights, keys, args.buffer_k)

    rows, medians = [], {}
    for name, rs in runs.items():
        times = sorted(r["time"] if r["time"] is not None else math.inf for r in rs)
        medians[name] = (statistics.median(times),
                         statistics.median(r["accuracy"] for r in rs if r["accuracy"]))
        rows.append([name, " ".join(show(t, ".0f") for t in times),
                     show(medians[name][0]), show(medians[name][1], ".4f"),
                     " ".join(show(r["accuracy"], ".4f") for r in rs),
                     round(statistics.fmean(r["updates"] for r in rs))])
    print(f"{platform.node()} {platform.machine()}, {args.parties} parties, FedBuff k="
          f"{args.buffer_k}, target {args.target}, budget {args.seconds:g} s, seed {args.seed}, "
          f"{args.repeat} runs each")
    print(tabulate(rows, headers=["run", f"s to {args.target} (each)", "median s",
                                  "median final", "finals", "updates (mean)"]))
    (t_plain, a_plain), (t_secure, a_secure) = medians["fedbuff"], medians["fedbuff + secure"]
    if math.isfinite(t_plain) and math.isfinite(t_secure):
        print(f"time to target: {t_secure / t_plain:.2f}x (goal <= 1.3x)")
    print(f"final accuracy: {100 * (a_secure - a_plain):+.2f} points (goal within 0.2)")
    helper_ms = statistics.fmean(r["helper_ms_per_update"] for r in runs["fedbuff + secure"])
    refused = sum(r["helper_refused"] for r in runs["fedbuff + secure"])
    print(f"bytes per update: {plain_bytes} plain, {masked_bytes} masked, "
          f"{masked_bytes / plain_bytes:.4f}x (goal <= 1.05x)")
    print(f"helper CPU per update: {helper_ms:.2f} ms (refused sets: {refused})")
    print(f"exactness: max |unmasked mean - plain mean| = {error:.3g}, bound 1/scale = "
          f"{bound:.3g} ({'within' if error <= bound else 'OUTSIDE'} the bound)")
    return 0


def show(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, fmt)


if __name__ == "__main__":
    raise SystemExit(main())
