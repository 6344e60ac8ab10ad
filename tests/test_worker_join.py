"""Races around the join: a party never loses a model broadcast while its join is in flight."""

from __future__ import annotations

import time
import uuid

import numpy as np

from messages.transport.connect import connect
from messages.transport.topology import Topology
from messages.wire.codec import decode, encode
from messages.wire.kinds import Join, Model, Update, Welcome
from worker import Worker, WorkerConfig

TINY = {"model": "worker.models:tiny_cnn", "data": "worker.data:load_synthetic"}
SYNC = {"local_steps": 2, "batch_size": 8, "learning_rate": 1e-3, "sync": True,
        "strategy": "fedavg"}


def test_a_model_broadcast_before_a_tensorless_welcome_is_trained_on() -> None:
    """The aggregator released version 0 (another party completed --min-parties) between
    handling this party's join and the party reading the welcome, which was sent before the
    release and so carries no model. In sync mode no other broadcast comes until this party
    contributes: losing version 0 here deadlocked the federation (seen in CI)."""
    url = f"memory://{uuid.uuid4().hex[:8]}"
    topology = Topology("mnist")
    with connect(url) as agg:
        topology.declare(agg)
        worker = Worker(WorkerConfig(party_id=0, num_parties=1, broker=url, **TINY)).start()
        try:
            deadline = time.monotonic() + 120
            join = None
            while join is None and time.monotonic() < deadline:
                join = agg.get(topology.control)
                time.sleep(0.05)
            assert join is not None, "the worker never joined"
            msg = decode(join.body)
            assert isinstance(msg, Join)
            tensors = {k: np.asarray(v) for k, v in msg.tensors.items()}
            agg.publish(topology.models, "", encode(Model(0, tensors)), persistent=False)
            time.sleep(0.5)  # the broadcast reaches the worker while it waits for the reply
            agg.reply(join, encode(Welcome(msg.party, True, "", -1, -1, 0, SYNC, {})))
            update = None
            while update is None and time.monotonic() < deadline:
                update = agg.get(topology.updates)
                time.sleep(0.05)
            assert update is not None, "the worker never trained on the broadcast version 0"
            sent = decode(update.body)
            assert isinstance(sent, Update) and sent.base_version == 0
        finally:
            worker.stop()
            assert worker.wait(60)
