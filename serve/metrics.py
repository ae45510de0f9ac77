"""Prometheus metrics for the server, in a registry of its own (so that several servers can share a process)."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
        """Expose ``/metrics`` over HTTP on ``host:port`` (0 picks a free port); returns the port. Every other path
        answers 404, so an HTTP health probe or client pointed here by mistake fails instead of reading "ready"."""
        registry = self.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's API)
                self._answer(send_body=True)

            def do_HEAD(self) -> None:  # noqa: N802
                self._answer(send_body=False)

            def _answer(self, send_body: bool) -> None:
                if urlsplit(self.path).path.rstrip("/") == "/metrics":
                    status, kind, body = 200, CONTENT_TYPE_LATEST, generate_latest(registry)
                else:
                    status, kind = 404, "text/plain; charset=utf-8"
                    body = b"not found: this port serves Prometheus metrics at /metrics only\n"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's API)
                pass  # scrapes every few seconds would flood the server's log

        class Server(ThreadingHTTPServer):
            address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]  # IPv4 or IPv6
            daemon_threads = True

        server = Server((host, port), Handler)
        threading.Thread(target=server.serve_forever, name="ponder-metrics", daemon=True).start()
        self._http = server
        return int(server.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
