"""The gRPC inference server: Open Inference Protocol v2 (plus Triton's extensions) over a model repository.

``create_server`` builds a server bound to an address and returns it with the port; ``serve`` is the command:
it runs until SIGTERM or SIGINT, then drains in-flight requests within a grace period and returns.

Under load: ``workers`` requests compute at once, up to ``max_queue`` more wait for a slot, and anything beyond
is refused with RESOURCE_EXHAUSTED (gRPC's own concurrent-RPC limit sits just above, so memory stays bounded).
A request whose deadline passes while it waits is dropped without being computed.

Below this module errors are the domain's (ponder.errors); :func:`status_of` is the one place that turns an
exception into the gRPC status a request answers with.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ponder import __version__
from ponder.errors import BadRequestError, ConfigError, NotFoundError, PonderError, UnavailableError
from ponder.generation import SAMPLING_KEYS
from ponder.limits import MAX_MESSAGE_MB
from ponder.serve import inference_pb2 as pb
from ponder.serve import inference_pb2_grpc as pb_grpc
from ponder.serve.listen import TLSFiles, check_address, check_port_free
from ponder.serve.metrics import Metrics
from ponder.serve.protocol import RequestError
from ponder.serve.repository import ModelVersion, Repository, check_root
from ponder.serve.requests import IDS_OUTPUTS, TEXT_INPUTS, TEXT_OUTPUTS, ModelRun, parse, respond

log = logging.getLogger("ponder.serve")
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
EXTENSIONS = ["model_configuration", "statistics", "parameters", "streaming", "model_repository_index"]
SPARE_THREADS = 8  # for cheap RPCs (health, metadata) beyond the inference capacity


# The domain's errors and the status each answers with (the first that matches).
DOMAIN_STATUS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (BadRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),  # a value out of range, e.g. a threshold
)


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC status (code, message) a request that raised ``exc`` answers with: a RequestError keeps its own
    code, the domain's errors map by :data:`DOMAIN_STATUS`, anything else is INTERNAL (and logged with its
    traceback): never a crash."""
    if isinstance(exc, RequestError):
        return exc.code, exc.message
    for kind, code in DOMAIN_STATUS:
        if isinstance(exc, kind):
            return code, str(exc)
    log.error("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


class Admission:
    """A bounded queue in front of ``workers`` compute slots."""

    def __init__(self, workers: int, max_queue: int, metrics: Metrics) -> None:
        self.workers, self.capacity = workers, workers + max_queue
        self.metrics = metrics
        self.draining = False
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(workers)
        self._admitted = 0
        self._running = 0

    @property
    def admitted(self) -> int:
        """Requests computing or waiting for a slot."""
        return self._admitted

    def _update(self) -> None:
        self.metrics.queue_depth.set(self._admitted - self._running)
        self.metrics.in_flight.set(self._admitted)

    @contextmanager
    def slot(self, context: grpc.ServicerContext) -> Iterator[float]:
        """Hold a compute slot for the block; yields the seconds spent waiting for it."""
        start = time.perf_counter()
        with self._lock:
            if self.draining:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            if self._admitted >= self.capacity:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"the queue is full ({self.capacity - self.workers} waiting, {self.workers} "
                                   f"computing): retry later")
            self._admitted += 1
            self._update()
        try:
            if not self._slots.acquire(timeout=_wait_limit(context.time_remaining())):
                raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   "the deadline passed while the request waited in the queue; it was not computed")
            try:
                with self._lock:
                    self._running += 1
                    self._update()
                remaining = context.time_remaining()
                if (remaining is not None and remaining <= 0) or not context.is_active():
                    raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                       "the deadline passed or the client left before a slot came; not computed")
                yield time.perf_counter() - start
            finally:
                with self._lock:
                    self._running -= 1
                self._slots.release()
        finally:
            with self._lock:
                self._admitted -= 1
                self._update()


def _wait_limit(remaining: float | None) -> float | None:
    """How long to wait for a slot: the time left before the deadline, or no limit when the client sent none.

    With no deadline grpc reports an enormous time remaining (tritonclient's default), which no lock wait accepts."""
    if remaining is None or remaining >= threading.TIMEOUT_MAX:
        return None
    return max(remaining, 0.0)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: Repository, admission: Admission, metrics: Metrics) -> None:
        self.repo, self.admission, self.metrics = repository, admission, metrics

    # -- helpers -----------------------------------------------------------------------------------------------
    def _call(self, context: grpc.ServicerContext, fn: Callable[[], Any]) -> Any:
        """Run ``fn``; a failure aborts the call with :func:`status_of`'s status."""
        try:
            return fn()
        except Exception as exc:
            context.abort(*status_of(exc))

    def _label(self, name: str) -> str:
        return name if name in self.repo.models else "(unknown)"  # unknown names must not grow the label set

    def _count(self, name: str, status: str, seconds: float, steps: Sequence[ModelRun] = ()) -> None:
        label = self._label(name)
        self.metrics.requests.labels(label, status).inc()
        self.metrics.latency.labels(label).observe(seconds)
        for step in steps:
            for layers in step.layer_counts():
                self.metrics.layers.labels(label).observe(layers)

    # -- health and metadata -----------------------------------------------------------------------------------
    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        ready = not self.admission.draining and any(v.ready for v in self.repo.all_versions())
        return pb.ServerReadyResponse(ready=ready)

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        def ready() -> Any:
            try:
                self.repo.find(request.name, request.version)
            except UnavailableError:  # there, but it failed to load; an unknown model is NOT_FOUND
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=not self.admission.draining)

        return self._call(context, ready)

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(name="ponder", version=__version__, extensions=EXTENSIONS)

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        def metadata() -> Any:
            mv = self.repo.find(request.name, request.version)
            tensor = pb.ModelMetadataResponse.TensorMetadata
            inputs, outputs = _signature(mv)
            return pb.ModelMetadataResponse(
                name=mv.name, versions=[v for v, m in self.repo.models[mv.name].items() if m.ready],
                platform="onnxruntime_onnx",
                inputs=[tensor(name=n, datatype=d, shape=s) for n, d, s in inputs],
                outputs=[tensor(name=n, datatype=d, shape=s) for n, d, s in outputs])

        return self._call(context, metadata)

    def ModelConfig(self, request: Any, context: grpc.ServicerContext) -> Any:
        def config() -> Any:
            mv = self.repo.find(request.name, request.version)
            engine = mv.engine
            assert engine is not None
            inputs, outputs = _signature(mv)
            params = {"act_threshold": engine.default_threshold, "n_layers": engine.n_layers,
                      "max_seq_len": engine.max_seq_len, "vocab_size": engine.vocab_size,
                      "tokenizer": "byte" if engine.byte_level else "word", "version": mv.version,
                      "halting": engine.metadata.get("halting", {}).get("name", ""),
                      "norm": engine.metadata.get("norm", {}).get("name", ""),
                      "generation": (f"inputs {', '.join(f'{k} ({v} [1])' for k, v in TEXT_INPUTS.items())}; "
                                     f"text_input required; sampling_parameters a JSON object of "
                                     f"{', '.join(SAMPLING_KEYS)}; outputs {', '.join(TEXT_OUTPUTS)}"
                                     if engine.can_generate else "none: exported without its decode graph")}
            cfg = pb.ModelConfig(
                name=mv.name, platform="onnxruntime_onnx", backend="onnxruntime", max_batch_size=0,
                input=[pb.ModelInput(name=n, data_type=_TYPES[d], dims=s)
                       for n, d, s in inputs],
                output=[pb.ModelOutput(name=n, data_type=_TYPES[d], dims=s) for n, d, s in outputs])
            for key, value in params.items():
                cfg.parameters[key].string_value = str(value)
            return pb.ModelConfigResponse(config=cfg)

        return self._call(context, config)

    def ModelStatistics(self, request: Any, context: grpc.ServicerContext) -> Any:
        def statistics() -> Any:
            chosen = self.repo.versions(request.name, request.version) if request.name else self.repo.all_versions()
            return pb.ModelStatisticsResponse(model_stats=[_stats(v) for v in chosen])

        return self._call(context, statistics)

    def RepositoryIndex(self, request: Any, context: grpc.ServicerContext) -> Any:
        index = pb.RepositoryIndexResponse.ModelIndex
        models = [index(name=v.name, version=v.version, state="READY" if v.ready else "UNAVAILABLE",
                        reason=v.error or "") for v in self.repo.all_versions() if v.ready or not request.ready]
        return pb.RepositoryIndexResponse(models=models)

    # -- inference ---------------------------------------------------------------------------------------------
    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        start = time.perf_counter()
        status, steps, mv = "INTERNAL", [], None
        try:
            mv = self.repo.find(request.model_name, request.model_version)
            job, input_s = _timed(parse, request, mv.engine)
            with self.admission.slot(context) as queue_s:
                step = job.run()
            steps, server_s = [step], time.perf_counter() - start
            response, output_s = _timed(respond, request, mv.name, mv.version, step, queue_s=queue_s,
                                        server_s=server_s)
            mv.stats.record(ok=True, total_s=time.perf_counter() - start, queue_s=queue_s, input_s=input_s,
                            compute_s=step.compute_s, output_s=output_s, batch=step.batch,
                            executions=step.executions)
            status = "OK"
            return response
        except Exception as exc:
            code, message = status_of(exc)
            status = code.name
            context.abort(code, message)
        finally:
            if mv is not None and status != "OK":
                mv.stats.record(ok=False, total_s=time.perf_counter() - start)
            self._count(request.model_name, status, time.perf_counter() - start, steps)

    def ModelStreamInfer(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        """Each request in the stream answers in order: one response, or one per token when generating.
        A refused request answers with ``error_message`` and the stream goes on (as Triton does)."""
        for request in request_iterator:
            start = time.perf_counter()
            status, steps = "OK", []
            try:
                for response, step in self._stream_one(request, context, start):
                    steps.append(step)
                    yield pb.ModelStreamInferResponse(infer_response=response)
            except Exception as exc:
                code, message = status_of(exc)
                status = code.name
                yield pb.ModelStreamInferResponse(error_message=message)
            finally:
                self._count(request.model_name, status, time.perf_counter() - start, steps)

    def _stream_one(self, request: Any, context: grpc.ServicerContext, start: float) -> Iterator[tuple[Any, ModelRun]]:
        mv = self.repo.find(request.model_name, request.model_version)
        job, input_s = _timed(parse, request, mv.engine)
        ok = False
        try:
            with self.admission.slot(context) as queue_s:
                if not job.streams:
                    step = job.run()
                    response, output_s = _timed(respond, request, mv.name, mv.version, step, queue_s=queue_s,
                                                server_s=time.perf_counter() - start)
                    mv.stats.record(ok=True, total_s=time.perf_counter() - start, queue_s=queue_s,
                                    input_s=input_s, compute_s=step.compute_s, output_s=output_s,
                                    batch=step.batch, executions=step.executions)
                    ok = True
                    yield response, step
                    return
                waited, compute, output_s, count = queue_s, 0.0, 0.0, 0
                for step in job.steps():
                    if not context.is_active():
                        break  # the client left: stop computing
                    compute += step.compute_s
                    count += 1
                    response, seconds = _timed(respond, request, mv.name, mv.version, step, queue_s=queue_s,
                                               server_s=time.perf_counter() - start)
                    output_s += seconds
                    yield response, step
                    queue_s = 0.0  # waited once, before the first token
                ok = True
                mv.stats.record(ok=True, total_s=time.perf_counter() - start, queue_s=waited, input_s=input_s,
                                compute_s=compute, output_s=output_s, batch=1, executions=count)
        finally:
            if not ok:
                mv.stats.record(ok=False, total_s=time.perf_counter() - start)


def _timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``fn``'s result and the seconds it took."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def _signature(mv: ModelVersion) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    """The one request shape that metadata advertises: ``input_ids`` in, every output of a forward pass out.

    Generic clients (perf_analyzer, genai-perf's input builders) send every advertised input and ask for every
    advertised output, so only inputs that go together are listed. Generation from ``text`` (byte-level models)
    is a second request shape, named in the model config's ``generation`` parameter and in docs/serving.md."""
    engine = mv.engine
    assert engine is not None
    inputs = [("input_ids", "INT64", [-1, -1])]
    outputs = [("logits", "FP32", [-1, -1, engine.vocab_size]), ("token_depth", "INT64", [-1, -1])]
    assert [o[0] for o in outputs] == list(IDS_OUTPUTS)
    return inputs, outputs


_TYPES = {"INT64": pb.TYPE_INT64, "FP32": pb.TYPE_FP32, "BYTES": pb.TYPE_STRING}


def _stats(v: ModelVersion) -> Any:
    s = v.stats
    with s.lock:
        def duration(d: Any) -> Any:
            return pb.StatisticDuration(count=d.count, ns=d.ns)

        return pb.ModelStatistics(
            name=v.name, version=v.version, last_inference=s.last_inference_ms, inference_count=s.inference_count,
            execution_count=s.execution_count,
            inference_stats=pb.InferStatistics(
                success=duration(s.success), fail=duration(s.fail), queue=duration(s.queue),
                compute_input=duration(s.compute_input), compute_infer=duration(s.compute_infer),
                compute_output=duration(s.compute_output)))


@dataclass
class Server:
    """A started-or-not gRPC server with its parts; ``drain`` is the graceful stop."""

    grpc_server: grpc.Server
    servicer: InferenceServicer
    health: health.HealthServicer
    metrics: Metrics
    port: int
    metrics_port: int | None = None

    def start(self) -> None:
        self.grpc_server.start()

    def drain(self, grace: float = 10.0) -> None:
        """Refuse new requests, let in-flight ones finish within ``grace`` seconds, then stop."""
        self.servicer.admission.draining = True
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(grace).wait()
        self.metrics.close()

    def stop(self) -> None:
        self.grpc_server.stop(None)
        self.metrics.close()


def create_server(repository: str | Path | Repository, address: str = "127.0.0.1:0", *, workers: int = 2,
                  max_queue: int = 64, max_message_mb: int = 64, tls: TLSFiles | None = None,
                  metrics_port: int | None = None, threads: int | None = None) -> tuple[Server, int]:
    """A server for every model under ``repository``, bound to ``address`` (not started); returns it and the port.

    Everything that can fail fast (settings, TLS files, the ports) is checked before any model is loaded."""
    for flag, value, low, high in (("--workers", workers, 1, None), ("--max-queue", max_queue, 0, None),
                                   ("--max-message-mb", max_message_mb, 1, MAX_MESSAGE_MB)):
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise PonderError(f"{flag} must be {bound}, got {value}")
    check_address(address)
    if not isinstance(repository, Repository):
        check_root(repository)
    credentials = tls.credentials() if tls else None
    check_port_free(address)
    metrics = Metrics()
    pool_size = workers + max_queue + SPARE_THREADS
    limit = max_message_mb * 1024 * 1024
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="ponder-rpc"),
                         maximum_concurrent_rpcs=pool_size,
                         options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                                  ("grpc.so_reuseport", 0)])
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as exc:
        raise PonderError(f"cannot listen on {address}: {exc} (is the port in use?)") from None
    served_metrics = None
    try:
        if metrics_port is not None:
            host = address.rsplit(":", 1)[0].strip("[]") or "127.0.0.1"
            try:
                served_metrics = metrics.serve(metrics_port, host)
            except OSError as exc:
                raise PonderError(f"cannot serve metrics on {host}:{metrics_port}: {exc.strerror or exc}") from None
        repo = repository if isinstance(repository, Repository) else Repository(repository, threads=threads)
    except BaseException:
        server.stop(None)
        metrics.close()
        raise
    admission = Admission(workers, max_queue, metrics)
    servicer = InferenceServicer(repo, admission, metrics)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server,
        pool=_ReflectionPool())
    return Server(server, servicer, health_servicer, metrics, port, served_metrics), port


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
    if server.metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", host, server.metrics_port)
    while not stop.wait(0.5):
        pass
    server.drain(grace)
    log.info("stopped")
    return 0
