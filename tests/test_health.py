"""/livez and /readyz beside /metrics: health that follows the service loop, not the server.

The metrics server runs on a thread of its own, so /metrics answers while the daemon's loop
is wedged; /livez does not (it follows the loop's ticks), and /readyz follows the broker
session. memory:// brokers, no TensorFlow.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import pytest

import aggregator.service
from aggregator import Aggregator, AggregatorConfig
from messages.daemon.metrics import MetricsEndpoint
from messages.errors import ConnectionLost
from worker import Worker, WorkerConfig

TINY = {"model": "worker.models:tiny_cnn", "data": "worker.data:load_synthetic"}
WINDOW = 1.0  # --liveness-seconds of these tests
MARGIN = 5.0  # how late a check may be on a loaded machine


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` until it is true (and return it), failing after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:g} s: {what}")
        time.sleep(0.05)


def test_endpoint_serves_metrics_liveness_and_readiness() -> None:
    endpoint = MetricsEndpoint()
    endpoint.stale_after = WINDOW
    endpoint.serve(0)
    try:
        assert endpoint.port
        status, body = get(endpoint.port, "/metrics")
        assert status == 200 and "python_info" not in body  # its own registry, as before
        status, body = get(endpoint.port, "/readyz")
        assert status == 503 and "not connected" in body
        endpoint.set_ready(True)
        assert get(endpoint.port, "/readyz")[0] == 200
        endpoint.set_ready(False, "broker gone")
        assert get(endpoint.port, "/readyz") == (503, "broker gone\n")
        endpoint.tick()
        assert get(endpoint.port, "/livez")[0] == 200
        status, body = until(lambda: (r := get(endpoint.port, "/livez"))[0] == 503 and r,
                             WINDOW + MARGIN, "/livez 503 without ticks")
        assert "has not ticked for" in body and body.count("\n") == 1
        endpoint.tick()
        assert get(endpoint.port, "/livez")[0] == 200
        assert get(endpoint.port, "/metrics")[0] == 200  # metrics whatever the loop does
    finally:
        endpoint.close()


def test_a_wedged_aggregator_loop_fails_livez_and_a_lost_broker_fails_readyz(
        monkeypatch: pytest.MonkeyPatch) -> None:
    refuse = threading.Event()  # the broker refuses connections (the supervisor backs off)
    wedge, release, drop = threading.Event(), threading.Event(), threading.Event()
    real_connect = aggregator.service.connect

    def connect(url: str) -> Any:
        if refuse.is_set():
            raise ConnectionLost("test: the broker is away")
        return real_connect(url)

    monkeypatch.setattr(aggregator.service, "connect", connect)
    refuse.set()
    agg = Aggregator(AggregatorConfig(broker=f"memory://{uuid.uuid4().hex[:8]}",
                                      federation=f"t{uuid.uuid4().hex[:10]}", evaluate=False,
                                      metrics_port=0, liveness_seconds=WINDOW, **TINY))
    flush = agg._flush_broadcast

    def flush_or_hang(**kwargs: Any) -> None:  # called on each turn of the service loop
        if wedge.is_set():
            release.wait(60)
        if drop.is_set():
            drop.clear()
            raise ConnectionLost("test: connection dropped")
        flush(**kwargs)

    monkeypatch.setattr(agg, "_flush_broadcast", flush_or_hang)
    agg.start()
    try:
        port = until(lambda: agg.metrics.port, 30, "the metrics port")
        # not connected yet: not ready, but alive (waiting between attempts on purpose)
        status, body = get(port, "/readyz")
        assert status == 503 and "not connected to the broker yet" in body
        started = time.monotonic()
        until(lambda: time.monotonic() - started > 2 * WINDOW, 10, "")
        assert get(port, "/livez")[0] == 200

        refuse.clear()
        until(lambda: get(port, "/readyz")[0] == 200, 30, "/readyz 200 once consuming")
        assert get(port, "/livez")[0] == 200

        # the loop hangs: /livez fails within the window, /metrics still answers
        wedge.set()
        status, body = until(lambda: (r := get(port, "/livez"))[0] == 503 and r,
                             WINDOW + MARGIN, "/livez 503 while the loop is wedged")
        assert "the service loop has not ticked for" in body
        assert get(port, "/metrics")[0] == 200
        wedge.clear()
        release.set()
        until(lambda: get(port, "/livez")[0] == 200, MARGIN, "/livez 200 after release")

        # the connection drops and the broker stays away: not ready, still alive
        refuse.set()
        drop.set()
        status, body = until(lambda: (r := get(port, "/readyz"))[0] == 503 and r, MARGIN,
                             "/readyz 503 after the connection dropped")
        assert "reconnecting" in body
        lost_at = time.monotonic()
        until(lambda: time.monotonic() - lost_at > 2 * WINDOW, 10, "")
        assert get(port, "/livez")[0] == 200
        refuse.clear()
        until(lambda: get(port, "/readyz")[0] == 200, 30, "/readyz 200 after reconnecting")
    finally:
        release.set()
        agg.stop()
        assert agg.wait(30)
    assert agg.metrics.readiness() == (False, "stopped")
    with pytest.raises(OSError):  # the server is gone with the daemon
        get(port, "/livez")


def test_a_worker_waiting_for_its_aggregator_is_alive_but_not_ready() -> None:
    party = Worker(WorkerConfig(party_id=0, num_parties=1,
                                broker=f"memory://{uuid.uuid4().hex[:8]}",
                                federation=f"t{uuid.uuid4().hex[:10]}", metrics_port=0,
                                liveness_seconds=WINDOW, **TINY)).start()
    try:
        port = until(lambda: party.metrics.port, 30, "the metrics port")
        status, body = until(lambda: (r := get(port, "/readyz"))[1].startswith("federation")
                             and r, 30, "/readyz: waiting for the aggregator")
        assert status == 503 and "waiting for its aggregator" in body
        started = time.monotonic()
        until(lambda: time.monotonic() - started > 2 * WINDOW, 10, "")
        assert get(port, "/livez")[0] == 200  # its wait goes round
    finally:
        party.stop()
        assert party.wait(30)
    assert party.metrics.readiness() == (False, "stopped")
