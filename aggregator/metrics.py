"""Prometheus metrics of the aggregator.

Each aggregator keeps its own registry (tests run several in one process) and serves it
only when ``--metrics-port`` is given; the same endpoint answers liveness probes.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from messages.daemon.metrics import MetricsEndpoint


class AggregatorMetrics(MetricsEndpoint):
    """The aggregator's instruments; ``port`` (0 = any free port) serves them over HTTP."""

    def __init__(self, port: int | None = None) -> None:
        super().__init__()
        r = self.registry
        self.applied = Counter("dfl_updates_applied", "Updates folded into the model",
                               registry=r)
        self.rejected = Counter("dfl_updates_rejected", "Messages dead-lettered, by reason",
                                ["reason"], registry=r)
        self.internal_errors = Counter(
            "dfl_internal_errors", "Deliveries whose handling raised an unexpected exception "
            "(dead-lettered as internal-error)", registry=r)
        self.dead_queue_depth = Gauge(
            "dfl_dead_queue_depth", "Messages in F.dead: dead letters, their reason records, "
            "and those the broker dead-lettered at the delivery limit", registry=r)
        self.duplicates = Counter("dfl_updates_duplicate",
                                  "Replayed or redelivered (party, seq) dropped", registry=r)
        self.staleness = Histogram("dfl_update_staleness",
                                   "Versions between an update's base and the model",
                                   buckets=(0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89), registry=r)
        self.apply_seconds = Histogram("dfl_apply_seconds",
                                       "Decode, validate and apply of one update",
                                       buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                0.1, 0.25, 1), registry=r)
        self.version = Gauge("dfl_model_version", "Global model version", registry=r)
        self.active_parties = Gauge("dfl_active_parties", "Parties holding a lease", registry=r)
        self.party_lag = Gauge("dfl_party_lag_versions",
                               "Versions between the model and a party's last base version",
                               ["party"], registry=r)
        self.queue_depth = Gauge("dfl_updates_queue_depth", "Messages ready in F.updates",
                                 registry=r)
        self.accuracy = Gauge("dfl_eval_accuracy", "Test accuracy of the last evaluated "
                              "version", registry=r)
        self.loss = Gauge("dfl_eval_loss", "Test loss of the last evaluated version",
                          registry=r)
        self.serve(port)


class EdgeMetrics(MetricsEndpoint):
    """An edge aggregator's instruments (``aggregator.edge``), named apart from the root's so
    that a dashboard summing ``dfl_updates_applied`` counts every update once."""

    def __init__(self, port: int | None = None) -> None:
        super().__init__()
        r = self.registry
        self.taken = Counter("dfl_edge_updates_taken", "Updates the root's state holds "
                             "through this edge's partial sums (acked)", registry=r)
        self.rejected = Counter("dfl_edge_updates_rejected", "Updates this edge dead-lettered, "
                                "by reason (its own checks or the root's)", ["reason"],
                                registry=r)
        self.duplicates = Counter("dfl_edge_updates_duplicate",
                                  "Updates the root already held (acked)", registry=r)
        self.partials = Counter("dfl_edge_partials", "Partial sums sent (repeats apart)",
                                registry=r)
        self.resent = Counter("dfl_edge_partials_resent",
                              "Partial sums sent again for want of an answer", registry=r)
        self.root_version = Gauge("dfl_edge_root_version",
                                  "The newest root version this edge knows", registry=r)
        self.serve(port)
