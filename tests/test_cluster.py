"""A federation on a three-node RabbitMQ cluster: the node that leads ``F.updates`` killed
with SIGKILL while it trains, then a rolling restart of all three nodes. The books balance as
in ``tests/test_chaos.py`` (0 lost, 0 applied twice) and the time to resume is reported.

The cluster is ``tests/cluster.py`` (three private nodes from the local RabbitMQ install,
joined with ``rabbitmqctl join_cluster``); the daemons get all three URLs in ``--broker``.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from messages.transport.topology import Topology
from tests.cluster import Cluster, Node, NodeError, start
from tests.test_chaos import Books, Federation

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]
_APPLIED = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO dfl\.aggregator: update "
                      r"\S+ staleness \d+: (?:applied|buffered)", re.M)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    try:
        c = start(tmp_path_factory.mktemp("cluster"))
    except NodeError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"no three-node cluster: {exc}")
        pytest.skip(f"no three-node cluster: {str(exc).splitlines()[0]}")
    print(f"\nCLUSTER three nodes up and joined in {c.started_in:.1f} s")
    yield c
    c.stop()


class ClusterFederation(Federation):
    """``Federation`` over every node's URL, with an audit queue that survives a node."""

    audit: dict[str, Any] = {"durable": True,
                             "arguments": {"x-queue-type": "quorum"}}

    def applied_times(self) -> list[float]:
        """When the aggregator applied (or buffered) each update, as Unix times."""
        return [datetime.strptime(m, "%Y-%m-%d %H:%M:%S,%f").timestamp()
                for m in _APPLIED.findall(self.log("aggregator"))]

    def resumed_after(self, since: float, timeout: float = 180) -> float:
        """Seconds from ``since`` (a Unix time) to the next update applied after it."""
        self.wait_until("an update applied again",
                        lambda: any(t > since for t in self.applied_times()), timeout)
        return min(t for t in self.applied_times() if t > since) - since

    def stop_and_balance(self) -> Books:
        """Stop the workers, then the aggregator (SIGTERM: a final checkpoint and its
        ledger), and balance the books at the version it reached."""
        for name, p in self.procs.items():
            if name != "aggregator":
                p.terminate()
        for name, p in self.procs.items():
            if name != "aggregator":
                p.wait(60)
        agg = self.procs["aggregator"]
        agg.terminate()
        try:
            agg.wait(120)
        except subprocess.TimeoutExpired:
            pytest.fail("the aggregator did not stop\n" + self.log("aggregator")[-4000:])
        return self.books()


def _back(cluster: Cluster, node: Node, queue: str) -> None:
    """Boot ``node`` again and wait until every member of ``queue`` is online."""
    node.boot()
    node.wait_up()
    deadline = time.monotonic() + 120
    while cluster.members_online(queue) < 3:
        assert time.monotonic() < deadline, f"{queue} did not get its three members back"
        time.sleep(0.5)


def test_the_leader_killed_then_a_rolling_restart_lose_nothing(
        cluster: Cluster, federation: str, tmp_path: Path) -> None:
    fed = ClusterFederation(cluster.urls, federation, tmp_path, versions=1_000_000)
    updates = Topology(federation).updates
    try:
        fed.aggregator()
        fed.worker(0)
        fed.worker(1)
        fed.wait_for_more_confirmed(8, timeout=180)
        leader = cluster.leader(updates)
        killed_at = time.time()
        leader.kill()
        resumed = {f"kill -9 of the leader {leader.name}": fed.resumed_after(killed_at)}
        new_leader = cluster.leader(updates)
        assert new_leader is not leader
        # the dashboard's "leader node" series: F.updates' queue metrics come from the new
        # leader's node alone (after the plugin's next collection)
        deadline = time.monotonic() + 60
        while cluster.reporting(updates) != [new_leader]:
            assert time.monotonic() < deadline, [n.name for n in cluster.reporting(updates)]
            time.sleep(1)
        _back(cluster, leader, updates)
        for node in cluster.nodes:  # rolling restart: one node at a time, in order
            stopped_at = time.time()
            node.stop()
            _back(cluster, node, updates)
            resumed[f"restart of {node.name}"] = fed.resumed_after(stopped_at)
        fed.wait_for_more_confirmed(6, timeout=180)
        books = fed.stop_and_balance()
    finally:
        fed.stop_all()
    summary = books.check(books.version)
    fed.check_versions()
    log = fed.log("aggregator")
    assert "using broker node" in log
    print("CLUSTER " + summary)
    for what, seconds in resumed.items():
        print(f"CLUSTER resumed {seconds:.1f} s after the {what}")
