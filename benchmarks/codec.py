"""Codec speed: encode+decode of an update message against baselines measured in the same run.

Baselines, on the same tensors: one plain copy of the bytes (``np.copyto``, the floor any
serializer that produces a separate buffer must pay), pickle protocol 5, and ``np.save`` /
``np.load`` into ``BytesIO`` (the format Flower puts in its protobufs). Figures are best of
``--repeat`` runs, in GB/s of tensor bytes, with ratios against each baseline.

    python -m benchmarks.codec [--sizes 0.1,1.2,10,50] [--repeat 7]
"""

from __future__ import annotations

import argparse
import io
import pickle  # baseline only: the wire never unpickles
import platform
import time
from collections.abc import Callable

import numpy as np

from messages.daemon.allocator import keep_large_buffers
from messages.types import Tensors
from messages.wire.codec import decode, encode
from messages.wire.kinds import Update

CNN_SHAPES = [(3, 3, 1, 32), (32,), (3, 3, 32, 64), (64,), (9216, 128), (128,), (128, 10), (10,)]


def tensors_of(millions: float, seed: int = 0) -> Tensors:
    """A model of about ``millions`` float32 parameters: the built-in CNN's shapes at 1.2M,
    otherwise one large kernel, a bias and two small layers."""
    rng = np.random.default_rng(seed)
    total = int(millions * 1e6)
    if abs(millions - 1.2) < 1e-9:
        shapes = CNN_SHAPES
    else:
        big = total - 4096 - 64 - 10
        shapes = [(big // 1024, 1024), (4096,), (64,), (10,)]
    return {f"layer{i}/w": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}


def best(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of ``repeat`` runs (after one warm-up), in seconds."""
    fn()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def measure(millions: float, repeat: int) -> dict[str, float]:
    tensors = tensors_of(millions)
    nbytes = sum(a.nbytes for a in tensors.values())
    update = Update("p0", 1, 0, 600, tensors)
    flat = np.concatenate([a.reshape(-1) for a in tensors.values()])
    target = np.empty_like(flat)

    def ours() -> None:
        body = encode(update)
        # the raw codec, whatever the broker's size limit (50M float32 is 200 MB)
        decoded = decode(body, max_bytes=len(body))
        assert isinstance(decoded, Update)

    def memcpy() -> None:
        np.copyto(target, flat)

    def pickled() -> None:
        pickle.loads(pickle.dumps(tensors, protocol=5))

    def npsave() -> None:
        out = []
        for a in tensors.values():
            buf = io.BytesIO()
            np.save(buf, a, allow_pickle=False)
            out.append(np.load(io.BytesIO(buf.getvalue()), allow_pickle=False))

    seconds = {name: best(fn, repeat) for name, fn in
               (("codec", ours), ("memcpy", memcpy), ("pickle5", pickled), ("npsave", npsave))}
    return {"bytes": nbytes, **{k: nbytes / v / 1e9 for k, v in seconds.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.codec", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.1,1.2,10,50",
                        help="model sizes in millions of float32 parameters")
    parser.add_argument("--repeat", type=int, default=7, help="runs per figure (best kept)")
    ns = parser.parse_args(argv)
    print(f"codec benchmark on {platform.machine()} {platform.python_version()}, "
          f"numpy {np.__version__}; GB/s of tensor bytes, best of {ns.repeat}")
    header = (f"{'params':>8} {'MB':>7} {'codec':>7} {'memcpy':>7} {'pickle5':>8} {'np.save':>8}"
              f"  {'x memcpy':>8} {'x pickle':>8} {'x np.save':>9}")
    # First with glibc's default malloc, then as the daemons run (messages.daemon.allocator): the
    # tuning cannot be undone in a process, so the default comes first.
    for tuned in (False, True):
        if tuned and not keep_large_buffers():
            print("no glibc mallopt here: the daemons' allocator tuning does not apply")
            break
        print("\nmalloc as the daemons tune it (freed buffers reused)" if tuned
              else "\nglibc malloc defaults (buffers over 32 MiB are fresh mmap pages)")
        print(header)
        for size in (float(s) for s in ns.sizes.split(",")):
            r = measure(size, ns.repeat)
            print(f"{size:>7}M {r['bytes'] / 1e6:7.1f} {r['codec']:7.2f} {r['memcpy']:7.2f} "
                  f"{r['pickle5']:8.2f} {r['npsave']:8.2f}  {r['codec'] / r['memcpy']:8.2f} "
                  f"{r['codec'] / r['pickle5']:8.2f} {r['codec'] / r['npsave']:9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
