"""Serving a Prometheus registry over HTTP, shared by the aggregator's and workers' metrics,
with the daemon's health on the same port.

``/livez`` answers 200 while the daemon's service loop has ticked (``tick()``) within
``stale_after`` seconds (``--liveness-seconds``, 30 s by default), else 503 saying how long
it has been: a wedged loop fails it even though this server, on its own thread, still
answers. ``/readyz`` answers 200 while the daemon is connected to the broker and consuming
(``set_ready``), else 503 with the reason. Every other path serves the metrics, as
prometheus_client's own server does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

DEFAULT_STALE_AFTER = 30.0
"""Seconds without a tick of the service loop after which ``/livez`` fails."""


class _Quiet(WSGIRequestHandler):
    """No access log: probes and scrapes every few seconds would drown the daemon's log."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class MetricsEndpoint:
    """A registry of its own (several services can share a process in tests and notebooks),
    served on ``port`` when one is given (0 picks a free port, see ``self.port``), with
    ``/livez`` and ``/readyz`` beside ``/metrics``. ``tick`` and ``set_ready`` are safe from
    any thread."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.port: int | None = None
        self.stale_after = DEFAULT_STALE_AFTER
        self._server: Any = None
        self._lock = threading.Lock()
        self._last_tick = time.monotonic()
        self._ready = False
        self._reason = "not connected to the broker yet"

    def tick(self) -> None:
        """The service loop went round once: the daemon is alive."""
        with self._lock:
            self._last_tick = time.monotonic()

    def set_ready(self, ready: bool, reason: str = "") -> None:
        """Connected to the broker and consuming (True), or not and why (False)."""
        with self._lock:
            self._ready, self._reason = ready, reason

    def liveness(self) -> tuple[bool, str]:
        with self._lock:
            since = time.monotonic() - self._last_tick
        if since <= self.stale_after:
            return True, f"ok: the service loop ticked {since:.1f} s ago"
        return False, (f"the service loop has not ticked for {since:.1f} s "
                       f"(limit {self.stale_after:g} s)")

    def readiness(self) -> tuple[bool, str]:
        with self._lock:
            return self._ready, "ok: connected and consuming" if self._ready else self._reason

    def serve(self, port: int | None) -> None:
        if port is not None and self._server is None:
            metrics = make_wsgi_app(self.registry)

            def app(environ: dict[str, Any], start_response: Callable[..., Any]
                    ) -> Iterable[bytes]:
                check = {"/livez": self.liveness,
                         "/readyz": self.readiness}.get(environ.get("PATH_INFO", ""))
                if check is None:
                    return metrics(environ, start_response)  # type: ignore[no-any-return]
                ok, text = check()
                body = (text + "\n").encode()
                start_response("200 OK" if ok else "503 Service Unavailable",
                               [("Content-Type", "text/plain; charset=utf-8"),
                                ("Content-Length", str(len(body))),
                                ("Cache-Control", "no-store")])
                return [body]

            self._server = make_server("0.0.0.0", port, app, ThreadingWSGIServer,
                                       handler_class=_Quiet)
            self.port = int(self._server.server_port)
            threading.Thread(target=self._server.serve_forever, name="metrics",
                             daemon=True).start()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
