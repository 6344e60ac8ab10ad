"""Prometheus metrics of one party: training time, publish latency, model version.

Each worker keeps its own registry (tests run several in one process) and serves it only
when ``--metrics-port`` is given.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from messages.daemon.metrics import MetricsEndpoint


class WorkerMetrics(MetricsEndpoint):
    """The worker's instruments; ``port`` (0 = any free port) serves them over HTTP."""

    def __init__(self, port: int | None = None) -> None:
        super().__init__()
        r = self.registry
        self.train_seconds = Histogram("dfl_worker_train_seconds",
                                       "Wall time of one round of local training",
                                       buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300),
                                       registry=r)
        self.publish_seconds = Histogram("dfl_worker_publish_seconds",
                                         "Publish of an update until the broker confirmed it",
                                         buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
                                         registry=r)
        self.model_version = Gauge("dfl_worker_model_version",
                                   "Newest global model version this party has", registry=r)
        self.ignored = Counter("dfl_worker_ignored_messages",
                               "Messages on the model queue ignored, by reason", ["reason"],
                               registry=r)
        self.updates_sent = Counter("dfl_worker_updates_sent",
                                    "Updates the broker confirmed", registry=r)
        self.epsilon = Gauge("dfl_worker_dp_epsilon",
                             "Differential-privacy epsilon spent so far (party-level "
                             "with --dp-noise, per record with --dp-sgd)", registry=r)
        self.serve(port)
