"""The gRPC inference server: Open Inference Protocol v2 (plus Triton's extensions) over a model repository.

``create_server`` builds a server bound to an address and returns it with the port; ``serve`` is the command:
it runs until SIGTERM or SIGINT, then drains in-flight requests within a grace period and returns.

The server runs on grpc.aio, on an event loop of its own thread (so that tests and the command drive it the
same way). Each model version has a :class:`~ponder.serve.scheduler.Scheduler` that batches its requests and
advances its generations together; ``workers`` of its runs compute at once, up to ``max_queue`` requests wait,
anything beyond is refused with RESOURCE_EXHAUSTED, and the request limits (:class:`~ponder.serve.requests.Limits`)
are checked before anything is computed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ponder.errors import PonderError, UnavailableError
from ponder.limits import MAX_MESSAGE_MB
from ponder.serve import inference_pb2 as pb
from ponder.serve.control import MODES, ModelControl
from ponder.serve.listen import TLSFiles, check_address, check_port_free
from ponder.serve.metrics import Metrics
from ponder.serve.repository import Repository, check_root
from ponder.serve.requests import Limits
from ponder.serve.scheduler import BatchSettings, Scheduler
from ponder.serve.servicer import SERVICE, InferenceServicer, method_handlers, status_of

__all__ = ["SERVICE", "Server", "TLSFiles", "create_server", "serve", "status_of"]
log = logging.getLogger("ponder.serve")
CLOSE_S = 0.5  # after the grace period: how long refused requests get to receive their UNAVAILABLE


class Server:
    """A gRPC server on its own event loop thread; ``start``, then ``drain`` (graceful) or ``stop``."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="ponder-serve", daemon=True)
        self._thread.start()
        self.grpc_server: Any = None
        self.servicer: InferenceServicer | None = None
        self.health: Any = None
        self.control: ModelControl | None = None
        self.poll_seconds = 15.0
        self.poller: Any = None
        self.port = 0
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self.http_runner: Any = None

    @property
    def schedulers(self) -> dict[tuple[str, str], Scheduler]:
        """The scheduler of every version served, by (name, version)."""
        if self.servicer is None:
            return {}
        return {(v.name, v.version): v.scheduler for v in self.servicer.repo.all_versions() if v.scheduler}

    def _all_schedulers(self) -> list[Scheduler]:
        retiring = [v.scheduler for v in self.control.retiring if v.scheduler] if self.control else []
        return [*self.schedulers.values(), *retiring]

    def call(self, coroutine: Any, timeout: float | None = None) -> Any:
        """Run ``coroutine`` on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def start(self) -> None:
        self.call(self.grpc_server.start())
        if self.control is not None and self.control.mode == "poll":
            self.poller = asyncio.run_coroutine_threadsafe(self.control.poll(self.poll_seconds), self.loop)

    def drain(self, grace: float = 10.0) -> None:
        """Refuse new requests, let those in flight finish within ``grace`` seconds; the rest get UNAVAILABLE."""
        self.call(self._drain(grace))
        self._close()

    def stop(self) -> None:
        self.call(self._drain(0.0))
        self._close()

    async def _drain(self, grace: float) -> None:
        if self.servicer is not None:
            self.servicer.draining = True
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        if self.poller is not None:
            self.poller.cancel()
        loop = asyncio.get_running_loop()
        end = loop.time() + grace
        while any(s.busy for s in self._all_schedulers()) and loop.time() < end:
            await asyncio.sleep(0.01)
        for scheduler in self._all_schedulers():
            scheduler.close(UnavailableError("the server is shutting down; retry on another replica or later"))
            scheduler.engine.terminate_runs()
        if self.grpc_server is not None:
            await self.grpc_server.stop(CLOSE_S)
        if self.http_runner is not None:
            await self.http_runner.cleanup()

    def _close(self) -> None:
        for v in self.servicer.repo.all_versions() if self.servicer else []:
            if v.executor is not None:
                v.executor.shutdown(wait=False, cancel_futures=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.metrics.close()


def create_server(repository: str | Path | Repository, address: str = "127.0.0.1:0", *, workers: int = 2,
                  max_queue: int = 64, max_message_mb: int = 64, tls: TLSFiles | None = None,
                  metrics_port: int | None = None, threads: int | None = None, max_batch_size: int = 32,
                  max_queue_delay_us: int = 0, max_batch_tokens: int = 16384,
                  max_tokens: int = 1024, http_port: int | None = None, model_control_mode: str = "none",
                  repository_poll_secs: float = 15.0, load_models: tuple[str, ...] = ()) -> tuple[Server, int]:
    """A server for every model under ``repository``, bound to ``address`` (not started); returns it and the port.

    ``workers``: runs of one model computing at once; ``max_queue``, ``max_batch_size``, ``max_queue_delay_us``
    and ``max_batch_tokens``: each model's batching (:class:`BatchSettings`, a model's config.json may set its own);
    ``max_tokens``: the most one generation may ask for; ``http_port``: serve the same over HTTP/REST on this port
    of the same host (None: not at all; 0 picks one, ``server.http_port`` says which). Everything that can fail
    fast (settings, TLS files, the ports) is checked before any model is loaded. ``model_control_mode``: Triton's
    none, explicit (only ``load_models`` at start, then what clients load) or poll (every ``repository_poll_secs``)."""
    if model_control_mode not in MODES:
        raise PonderError(f"--model-control-mode must be one of {', '.join(MODES)}, got {model_control_mode!r}")
    if not repository_poll_secs > 0:
        raise PonderError(f"--repository-poll-secs must be > 0, got {repository_poll_secs}")
    if load_models and model_control_mode != "explicit":
        raise PonderError("--load-model goes with --model-control-mode explicit (the other modes load every model)")
    for flag, value, low, high in (("--workers", workers, 1, None), ("--max-queue", max_queue, 0, None),
                                   ("--max-message-mb", max_message_mb, 1, MAX_MESSAGE_MB),
                                   ("--max-batch-size", max_batch_size, 1, None),
                                   ("--max-queue-delay-us", max_queue_delay_us, 0, None),
                                   ("--max-batch-tokens", max_batch_tokens, 2, None),
                                   ("--max-tokens", max_tokens, 1, None)):
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise PonderError(f"{flag} must be {bound}, got {value}")
    check_address(address)
    if not isinstance(repository, Repository):
        check_root(repository)
    credentials = tls.credentials() if tls else None
    check_port_free(address)
    host = address.rsplit(":", 1)[0].strip("[]") or "127.0.0.1"
    if http_port is not None:
        if not 0 <= http_port <= 65535:
            raise PonderError(f"--http-port must be a port (0 picks one, -1 turns HTTP off), got {http_port}")
        if http_port:
            check_port_free(f"{address.rsplit(':', 1)[0]}:{http_port}", flag="--http-port")
    metrics = Metrics()
    server = Server(metrics)
    try:
        if metrics_port is not None:
            try:
                server.metrics_port = metrics.serve(metrics_port, host)
            except OSError as exc:
                raise PonderError(f"cannot serve metrics on {host}:{metrics_port}: {exc.strerror or exc}") from None
        repo = repository if isinstance(repository, Repository) else \
            Repository(repository, threads=threads, load=model_control_mode != "explicit")
        defaults = BatchSettings(max_batch_size, max_queue_delay_us, max_queue, max_batch_tokens)
        limits = Limits(max_tokens=max_tokens, max_message_bytes=max_message_mb * 1024 * 1024)
        server.poll_seconds = repository_poll_secs
        control = ModelControl(repo, defaults, workers, model_control_mode, lambda mv: _counter(server, mv))
        server.call(_build(server, repo, address, credentials, control, limits, max_message_mb, load_models))
        if http_port is not None:
            from ponder.serve.http import start_http

            assert server.servicer is not None
            server.http_runner, server.http_port = server.call(
                start_http(server.servicer, host, http_port, max_message_mb * 1024 * 1024, tls))
    except BaseException:
        server._close()
        raise
    return server, server.port


def _counter(server: Server, mv: Any) -> Any:
    def executed(rows: int) -> None:
        mv.stats.execution()
        server.metrics.execution(mv.name, mv.version)

    return executed


async def _build(server: Server, repo: Repository, address: str, credentials: Any, control: ModelControl,
                 limits: Limits, max_message_mb: int, load_models: tuple[str, ...]) -> None:
    """The grpc.aio server and the served models (warmed up), made on the server's loop."""
    limit = max_message_mb * 1024 * 1024
    grpc_server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                           ("grpc.max_send_message_length", limit), ("grpc.so_reuseport", 0)])
    try:
        server.port = grpc_server.add_secure_port(address, credentials) if credentials else \
            grpc_server.add_insecure_port(address)
    except RuntimeError as exc:
        raise PonderError(f"cannot listen on {address}: {exc} (is the port in use?)") from None
    await control.start(list(load_models))
    server.control = control
    metrics = server.metrics
    metrics.queue_depth.set_function(lambda: sum(s.pending for s in server.schedulers.values()))
    metrics.triton.pending = lambda: [(name, version, s.pending) for (name, version), s in server.schedulers.items()]
    servicer = InferenceServicer(repo, metrics, limits, control)
    grpc_server.add_generic_rpc_handlers((method_handlers(servicer),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], grpc_server,
        pool=_ReflectionPool())
    server.grpc_server, server.servicer, server.health = grpc_server, servicer, health_servicer


class _ReflectionPool:
    """Reflection over ponder's private descriptor pool and protobuf's default one (health, reflection)."""

    def __init__(self) -> None:
        from google.protobuf import descriptor_pool

        self.pools = [pb.POOL, descriptor_pool.Default()]

    def _first(self, method: str, *args: Any) -> Any:
        error: Exception | None = None
        for pool in self.pools:
            try:
                return getattr(pool, method)(*args)
            except KeyError as exc:
                error = exc
        raise error or KeyError(args)

    def FindFileByName(self, name: str) -> Any:  # noqa: N802 (the pool's API)
        return self._first("FindFileByName", name)

    def FindFileContainingSymbol(self, symbol: str) -> Any:  # noqa: N802
        return self._first("FindFileContainingSymbol", symbol)

    def FindExtensionByNumber(self, message: Any, number: int) -> Any:  # noqa: N802
        return self._first("FindExtensionByNumber", message, number)

    def FindAllExtensions(self, message: Any) -> Any:  # noqa: N802
        return self._first("FindAllExtensions", message)


def serve(repository: str | Path, address: str = "127.0.0.1:8001", *, grace: float = 10.0,
          **options: Any) -> int:
    """Serve until SIGTERM or SIGINT, then drain within ``grace`` seconds; returns the exit status (0)."""
    server, port = create_server(repository, address, **options)
    assert server.servicer is not None
    repo = server.servicer.repo
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        log.info("%s: draining (grace %.0f s)", signal.Signals(signum).name, grace)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    host = address.rsplit(":", 1)[0]
    ready = [f"{v.name}/{v.version}" for v in repo.all_versions() if v.ready]
    failed = [f"{v.name}/{v.version}" for v in repo.all_versions() if not v.ready]
    log.info("listening on %s:%d (%s); models ready: %s%s", host, port, "TLS" if options.get("tls") else "plaintext",
             ", ".join(ready) or "none", f"; failed: {', '.join(failed)}" if failed else "")
    if server.http_port is not None:
        log.info("HTTP/REST on %s://%s:%d/v2", "https" if options.get("tls") else "http", host, server.http_port)
    if server.metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", host, server.metrics_port)
    while not stop.wait(0.5):
        pass
    server.drain(grace)
    log.info("stopped")
    return 0
