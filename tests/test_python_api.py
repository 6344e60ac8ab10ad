"""The notebook path: create, start, wait, read the log, get a Keras model."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from aggregator import Aggregator, AggregatorConfig
from worker import Worker, WorkerConfig

pytestmark = pytest.mark.slow

TINY = {"model": "worker.models:tiny_cnn", "data": "worker.data:load_synthetic"}


@pytest.mark.parametrize("strategy", ["fedasync", "fedbuff", "fedavg"])
def test_a_federation_runs_from_python_and_returns_a_keras_model(strategy: str) -> None:
    broker = f"memory://{uuid.uuid4().hex[:8]}"
    agg = Aggregator(AggregatorConfig(broker=broker, strategy=strategy, min_parties=2,
                                      max_versions=8, local_steps=5, eval_every_seconds=0.5,
                                      **TINY)).start()
    parties = [Worker(WorkerConfig(party_id=i, num_parties=2, broker=broker, **TINY)).start()
               for i in range(2)]
    assert agg.wait(240)
    for p in parties:
        assert p.wait(60)
        assert p.stats.updates_sent > 0 and p.stats.stopped_by.startswith("aggregator")
    history = agg.history
    assert history[-1]["version"] == 8 and history[-1]["accuracy"] > history[0]["accuracy"]
    model = agg.global_model()
    for got, want in zip(model.get_weights(), agg.weights, strict=True):
        np.testing.assert_array_equal(got, want)
    assert agg.status.updates >= 8
    if strategy == "fedavg":  # sync rounds: one update from each party per version
        assert agg.status.updates == 16
