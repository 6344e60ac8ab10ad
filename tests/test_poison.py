"""One message, or one party, must never stop the federation (real processes, real RabbitMQ).

- A message that crashes the aggregator process (a test-only hook stands in for a bug nobody
  has found) is redelivered after each restart until the broker's delivery limit
  dead-letters it; then the federation goes on, having lost nothing else.
- A party that floods the aggregator with never-finished chunk sets, 100 MB bodies and top-k
  claims of huge tensors cannot grow its memory past the ceiling the README states, and
  genuine updates still apply.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from aggregator.service import CRASH_HOOK
from messages.errors import FederationError
from messages.transport.connect import connect
from messages.transport.topology import Topology
from messages.wire.chunks import (
    CHUNK_COUNT,
    CHUNK_FROM,
    CHUNK_ID,
    CHUNK_INDEX,
    CHUNK_SHA256,
    CHUNK_TOTAL,
)
from messages.wire.codec import encode
from messages.wire.kinds import Update
from tests.processes import Procs
from tests.test_aggregator_service import SHAPES, Client, body, delta

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]
MiB = 1024 * 1024


@pytest.fixture
def topology(federation: str) -> Topology:
    return Topology(federation, delivery_limit=3)


@pytest.fixture
def client(amqp_url: str, topology: Topology) -> Iterator[Client]:
    c = Client(amqp_url, topology)
    yield c
    c.b.close()
    with connect(amqp_url) as b:
        for q in (topology.updates, topology.control, topology.dead):
            b.delete_queue(q)


def start_aggregator(procs: Procs, url: str, topology: Topology, tmp: Path, *extra: str,
                     env: dict[str, str] | None = None) -> None:
    procs.start("aggregator", "aggregator", "--broker", url, "--federation",
                topology.federation, "--no-eval", "--min-parties", "1",
                "--delivery-limit", str(topology.delivery_limit),
                "--checkpoint-dir", str(tmp / "checkpoints"),
                "--checkpoint-every-seconds", "0.2", *extra, env=env)


def join(client: Client, procs: Procs, party: str) -> int:
    """Join ``party`` once the aggregator answers; its first seq."""
    got: list[int] = []

    def answered() -> bool:
        try:
            got.append(client.join(party).next_seq)
        except FederationError:
            return False
        return True

    procs.wait_until(f"{party} to join", answered, 60)
    return got[0]


def rss(pid: int, field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak) of process ``pid``, in bytes."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    assert match, text
    return int(match.group(1)) * 1024


def test_a_message_that_crashes_the_aggregator_ends_in_f_dead_after_the_delivery_limit(
        amqp_url: str, topology: Topology, client: Client, procs: Procs,
        tmp_path: Path) -> None:
    env = {CRASH_HOOK: "evil"}
    start_aggregator(procs, amqp_url, topology, tmp_path, env=env)
    client.listen("a")
    seq = join(client, procs, "a")
    client.pump(lambda: len(client.models) == 1, timeout=30)
    began = time.monotonic()
    client.send(encode(Update("evil", 0, 0, 1, delta(1.0))))  # crashes whoever reads it
    client.update("a", seq, 0)  # a genuine update right behind it
    crashes = 0
    while not any(m.version >= 1 for m in client.models):
        agg = procs.procs["aggregator"]
        if agg.poll() is not None:
            assert agg.returncode == 70, procs.log("aggregator")[-3000:]
            crashes += 1
            assert crashes <= topology.delivery_limit + 1, procs.log("aggregator")[-3000:]
            start_aggregator(procs, amqp_url, topology, tmp_path, env=env)  # as systemd would
        client.b.process_events(0.05)
        assert time.monotonic() - began < 120, procs.log("aggregator")[-3000:]
    resumed = time.monotonic() - began
    # delivered limit + 1 times, each a crash, then dead-lettered by the broker itself
    assert crashes == topology.delivery_limit + 1
    client.pump(lambda: len(client.dead) == 1)
    [letter] = client.dead
    assert letter.reason == "delivery-limit" and letter.queue == topology.updates
    assert procs.procs["aggregator"].poll() is None
    print(f"\nPOISON crashes={crashes} poison-to-applied={resumed:.1f}s")


def chunk_headers(cid: str, index: int, count: int, total: int, sender: str
                  ) -> dict[str, object]:
    return {CHUNK_ID: cid, CHUNK_INDEX: index, CHUNK_COUNT: count, CHUNK_TOTAL: total,
            CHUNK_SHA256: "0" * 64, CHUNK_FROM: sender}


def test_hostile_chunks_and_huge_bodies_stay_under_the_memory_ceiling(
        amqp_url: str, topology: Topology, client: Client, procs: Procs,
        tmp_path: Path) -> None:
    prefetch, pending, chunk = 4, 8 * MiB, 64 * 1024
    start_aggregator(procs, amqp_url, topology, tmp_path, "--prefetch", str(prefetch),
                     "--max-chunk-bytes", str(chunk), "--max-message-bytes", str(4 * MiB),
                     "--max-pending-chunk-bytes", str(pending), "--max-pending-chunks", "256",
                     "--chunk-timeout", "600")
    client.listen("a")
    seq = join(client, procs, "a")
    client.pump(lambda: len(client.models) == 1, timeout=30)
    pid = procs.procs["aggregator"].pid
    base = rss(pid, "VmRSS")
    piece = b"\x01" * (chunk - 1024)
    for i in range(1000):  # never-finished sets: chunk 0 of 2, ten made-up senders
        client.b.publish("", topology.updates, piece, headers=chunk_headers(
            f"set-{i}", 0, 2, 2 * len(piece), f"p{i % 10}"))
    huge = b"\x00" * (100 * MiB)
    for _ in range(3):  # bodies far over --max-message-bytes, as one message each
        client.send(huge)
    del huge
    for _ in range(20):  # a few bytes claiming 2**31-element dense tensors
        client.send(body(encoding="topk", seq=seq, tensors=[
            [n, "float32", [2**31 - 1], np.ones(1, "<f4").tobytes(),
             np.zeros(1, "<u4").tobytes()] for n in SHAPES]))
    client.update("a", seq, 0)  # and a genuine update still applies
    client.pump(lambda: any(m.version >= 1 for m in client.models), timeout=180)
    peak = rss(pid, "VmHWM")
    ceiling = base + pending + prefetch * 2 * 100 * MiB  # README: RSS ceiling, big bodies
    windows = [int(w) for w in re.findall(r"window of (\d+) deliveries",
                                          procs.log("aggregator"))]
    print(f"\nMEMORY base={base / MiB:.0f} MiB peak={peak / MiB:.0f} MiB "
          f"ceiling={ceiling / MiB:.0f} MiB windows={sorted(set(windows))}")
    assert peak <= ceiling
    assert max(windows, default=prefetch) <= prefetch + 256
    assert procs.procs["aggregator"].poll() is None
