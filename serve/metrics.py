"""Prometheus metrics for the server, in a registry of its own (so that several servers can share a process)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
LAYER_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("ponder_requests", "Inference requests by model and final gRPC status",
                                ["model", "status"], registry=self.registry)
        self.latency = Histogram("ponder_request_latency_seconds", "Server time per inference request",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.layers = Histogram("ponder_layers_executed", "Layers executed per model run (per generated token "
                                "when generating)", ["model"], buckets=LAYER_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("ponder_queue_depth", "Requests waiting for a compute slot",
                                 registry=self.registry)
        self.in_flight = Gauge("ponder_in_flight", "Requests admitted and not yet finished", registry=self.registry)
        self._http: Any = None

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose /metrics over HTTP on ``host:port`` (0 picks a free port); returns the port."""
        from prometheus_client import start_http_server

        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
