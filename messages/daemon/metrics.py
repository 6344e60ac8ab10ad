"""Serving a Prometheus registry over HTTP, shared by the aggregator's and workers' metrics."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, start_http_server


class MetricsEndpoint:
    """A registry of its own (several services can share a process in tests and notebooks),
    served on ``port`` when one is given (0 picks a free port, see ``self.port``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.port: int | None = None
        self._server: Any = None

    def serve(self, port: int | None) -> None:
        if port is not None and self._server is None:
            self._server, _thread = start_http_server(port, registry=self.registry)
            self.port = int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
