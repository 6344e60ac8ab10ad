"""Long local training is not a dead party; a full updates queue is backed off, not dropped."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

import pytest

from aggregator import Aggregator, AggregatorConfig
from messages.errors import PublishRejected
from messages.transport.connect import connect
from messages.transport.topology import Topology
from messages.wire.codec import encode
from messages.wire.kinds import Heartbeat
from worker import Worker, WorkerConfig

TINY = {"model": "worker.models:tiny_cnn", "data": "worker.data:load_synthetic"}


@pytest.fixture
def cleanup(broker_url: str, federation: str) -> Iterator[None]:
    yield
    with connect(broker_url) as b:
        t = Topology(federation)
        for q in (t.updates, t.control, t.dead):
            b.delete_queue(q)


@pytest.mark.slow
def test_training_longer_than_the_lease_and_the_amqp_heartbeat_keeps_the_party_alive(
        broker_url: str, federation: str, cleanup: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    # AMQP heartbeat of 2 s: a fit that blocked the connection's thread would be dropped.
    url = broker_url + ("?heartbeat=2" if broker_url.startswith("amqp") else "")
    agg = Aggregator(AggregatorConfig(broker=url, federation=federation, evaluate=False,
                                      min_parties=1, max_versions=2, lease_seconds=3.0,
                                      local_steps=100, **TINY)).start()
    party = Worker(WorkerConfig(party_id=0, num_parties=1, broker=url, federation=federation,
                                heartbeat_seconds=0.2, slowdown=10.0, **TINY)).start()
    started = time.monotonic()
    assert agg.wait(120)
    assert party.wait(30)
    assert time.monotonic() - started > 2 * 3.0  # the rounds outlived the lease and heartbeat
    assert "lease expired" not in caplog.text
    assert "broker unavailable" not in caplog.text and "connection lost" not in caplog.text
    assert agg.status.updates == 2 and agg.membership.parties["0"].active


def test_a_party_backs_off_while_the_updates_queue_is_full_and_delivers_later(
        broker_url: str, federation: str, cleanup: None) -> None:
    topology = Topology(federation, updates_max_length=1)
    filler = connect(broker_url)
    topology.declare(filler)
    fillers = 0
    with contextlib.suppress(PublishRejected):  # quorum queues take one over the limit
        while fillers < 5:
            filler.publish("", topology.updates, b"filler")
            fillers += 1
    worker = Worker(WorkerConfig(broker=broker_url, federation=federation,
                                 updates_max_length=1))
    update = encode(Heartbeat("0", 1))
    worker._pending = (7, update)
    broker = connect(broker_url)
    thread = threading.Thread(target=worker._publish_pending, args=(broker,))
    thread.start()
    time.sleep(1.0)
    assert thread.is_alive() and worker.stats.rejected_publishes >= 1
    drained = [filler.get(topology.updates) for _ in range(fillers)]
    assert all(d is not None and d.body == b"filler" for d in drained)
    thread.join(30)
    assert not thread.is_alive() and worker._pending is None and worker.stats.last_seq == 7
    delivered = filler.get(topology.updates)
    assert delivered is not None and delivered.body == update
    broker.close()
    filler.close()
