"""Prometheus metrics for the server, in a registry of its own (so that several servers can share a process).

Two families: ponder's own (``ponder_*``: requests by status, latency, layers executed, queue depth) and
Triton's (``nv_inference_*``, same names, labels and meaning as Triton's, so its dashboards work unchanged).
prometheus_client would add ``_total`` to counter names, which Triton's do not have, so :class:`TritonSeries`
writes its own lines of the text format."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
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
        self.triton = TritonSeries()
        self._http: Any = None

    def started(self) -> None:
        self.in_flight.inc()

    def inference(self, model: str, version: str, *, rows: int, total_s: float, queue_s: float,
                  compute_s: float, layers: list[int]) -> None:
        """A request that succeeded: its rows, durations and the layers of each of its model runs."""
        for value in layers:
            self.layers.labels(model).observe(value)
        t = self.triton
        t.add("nv_inference_count", model, version, rows)
        t.add("nv_inference_queue_duration_us", model, version, queue_s * 1e6)
        t.add("nv_inference_compute_infer_duration_us", model, version, compute_s * 1e6)

    def execution(self, model: str, version: str) -> None:
        self.triton.add("nv_inference_exec_count", model, version, 1)

    def finished(self, model: str, version: str, status: str, seconds: float) -> None:
        """Any request at its end, with its final gRPC status name."""
        self.in_flight.dec()
        self.requests.labels(model, status).inc()
        self.latency.labels(model).observe(seconds)
        t = self.triton
        t.add("nv_inference_request_duration_us", model, version, seconds * 1e6)
        if status == "OK":
            t.add("nv_inference_request_success", model, version, 1)
        else:
            t.add("nv_inference_request_failure", model, version, 1, reason=FAILURE_REASONS.get(status, "OTHER"))

    def exposition(self) -> bytes:
        return generate_latest(self.registry) + self.triton.text()

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose ``/metrics`` over HTTP on ``host:port`` (0 picks a free port); returns the port. Every other path
        answers 404, so an HTTP health probe or client pointed here by mistake fails instead of reading "ready"."""
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's API)
                self._answer(send_body=True)

            def do_HEAD(self) -> None:  # noqa: N802
                self._answer(send_body=False)

            def _answer(self, send_body: bool) -> None:
                if urlsplit(self.path).path.rstrip("/") == "/metrics":
                    status, kind, body = 200, CONTENT_TYPE_LATEST, metrics.exposition()
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


# Triton's failure reasons for the gRPC statuses a request can end with
FAILURE_REASONS = {"RESOURCE_EXHAUSTED": "REJECTED", "UNAVAILABLE": "REJECTED", "CANCELLED": "CANCELED",
                   "DEADLINE_EXCEEDED": "CANCELED", "INTERNAL": "BACKEND"}


class TritonSeries:
    """Triton's ``nv_inference_*`` series by model and version (cumulative, as Triton's are)."""

    HELP = {
        "nv_inference_request_success": ("counter", "Number of successful inference requests, all batch sizes"),
        "nv_inference_request_failure": ("counter", "Number of failed inference requests, all batch sizes"),
        "nv_inference_count": ("counter", "Number of inferences performed (a batch of n counts n)"),
        "nv_inference_exec_count": ("counter", "Number of model executions performed (batching makes them fewer)"),
        "nv_inference_request_duration_us": ("counter", "Cumulative inference request duration in microseconds"),
        "nv_inference_queue_duration_us": ("counter", "Cumulative inference queuing duration in microseconds"),
        "nv_inference_compute_infer_duration_us": ("counter", "Cumulative compute inference duration in "
                                                              "microseconds"),
        "nv_inference_pending_request_count": ("gauge", "Instantaneous number of pending requests awaiting "
                                                        "execution per-model"),
    }

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.pending: Callable[[], list[tuple[str, str, int]]] = list  # (model, version, requests waiting)

    def add(self, name: str, model: str, version: str, value: float, **labels: str) -> None:
        key = (name, (("model", model), ("version", version), *sorted(labels.items())))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + value

    def text(self) -> bytes:
        with self._lock:
            values = dict(self._values)
        for model, version, count in self.pending():
            values[("nv_inference_pending_request_count", (("model", model), ("version", version)))] = count
        lines = []
        for name, (kind, text) in self.HELP.items():
            samples = [(labels, v) for (n, labels), v in sorted(values.items()) if n == name]
            if not samples:
                continue
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            for labels, v in samples:
                label_text = ",".join(f'{k}="{_escape(val)}"' for k, val in labels)
                lines.append(f"{name}{{{label_text}}} {int(v)}")  # whole counts and microseconds, as Triton
        return ("\n".join(lines) + "\n").encode() if lines else b""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
