"""The Open Inference Protocol v2 service (plus Triton's extensions) on grpc.aio.

Every RPC is a coroutine on one event loop: an open stream costs a little memory and no thread, and health,
metadata and statistics answer at once whatever the models are computing (the computing happens in each model's
:class:`~ponder.serve.scheduler.Scheduler`, off the loop).

Below this module errors are the domain's (ponder.errors); :func:`status_of` is the one place that turns an
exception into the gRPC status a request answers with.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from ponder import __version__
from ponder.errors import BadRequestError, ConfigError, NotFoundError, UnavailableError
from ponder.generation import SAMPLING_KEYS
from ponder.serve import inference_pb2 as pb
from ponder.serve.control import ControlError
from ponder.serve.metrics import Metrics
from ponder.serve.protocol import RequestError
from ponder.serve.repository import ModelVersion, Repository
from ponder.serve.requests import IDS_OUTPUTS, TEXT_INPUTS, TEXT_OUTPUTS, Limits, ModelRun, parse, respond
from ponder.serve.scheduler import DeadlineError, QueueFullError, Scheduler

log = logging.getLogger("ponder.serve")
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
EXTENSIONS = ["model_configuration", "statistics", "parameters", "streaming", "model_repository",
              "model_repository_index"]
NO_DEADLINE = 1e6  # seconds: grpc reports "no deadline" as an enormous time remaining

# The domain's errors and the status each answers with (the first that matches).
DOMAIN_STATUS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (ControlError, grpc.StatusCode.FAILED_PRECONDITION),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (DeadlineError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (BadRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),  # a value out of range, e.g. a threshold
)


def code_of(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code a request that raised ``exc`` answers with (see :func:`status_of`)."""
    if isinstance(exc, RequestError):
        return exc.code
    return next((code for kind, code in DOMAIN_STATUS if isinstance(exc, kind)), grpc.StatusCode.INTERNAL)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status (code, message) a request that raised ``exc`` answers with: a RequestError keeps its own
    code, the domain's errors map by :data:`DOMAIN_STATUS`, anything else is INTERNAL (and logged with its
    traceback): never a crash."""
    code = code_of(exc)
    if isinstance(exc, RequestError):
        return code, exc.message
    if code != grpc.StatusCode.INTERNAL:
        return code, str(exc)
    log.error("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


@dataclass
class Undecodable:
    """A request message protobuf could not parse (answered INVALID_ARGUMENT instead of grpc's INTERNAL)."""

    error: str


def deadline_of(context: Any) -> float | None:
    """The request's deadline on the event loop's clock, or None when the client sent none."""
    remaining = context.time_remaining()
    if remaining is None or remaining >= NO_DEADLINE:
        return None
    return asyncio.get_running_loop().time() + remaining


class InferenceServicer:
    def __init__(self, repository: Repository, metrics: Metrics, limits: Limits, control: Any = None) -> None:
        self.repo, self.metrics, self.limits, self.control = repository, metrics, limits, control
        self.draining = False

    # -- helpers -----------------------------------------------------------------------------------------------
    async def _call(self, request: Any, context: Any, fn: Any) -> Any:
        """``fn(request)``; a failure aborts the call with :func:`status_of`'s status."""
        try:
            if isinstance(request, Undecodable):
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid message: "
                                                                     f"{request.error}")
            return fn(request)
        except Exception as exc:
            await context.abort(*status_of(exc))

    def _scheduler(self, mv: ModelVersion) -> Scheduler:
        if self.draining:
            raise UnavailableError("the server is shutting down")
        if mv.scheduler is None:
            raise UnavailableError(f"model {mv.name!r} version {mv.version} is not serving (it was unloaded)")
        return mv.scheduler

    # -- health and metadata -----------------------------------------------------------------------------------
    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 (the protocol's names)
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        ready = not self.draining and any(v.ready for v in self.repo.all_versions())
        return pb.ServerReadyResponse(ready=ready)

    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        def ready(request: Any) -> Any:
            try:
                self.repo.find(request.name, request.version)
            except UnavailableError:  # there, but it failed to load; an unknown model is NOT_FOUND
                return pb.ModelReadyResponse(ready=False)
            except NotFoundError:
                if request.name not in self.repo.models and request.name not in self.repo.model_names(quiet=True):
                    raise
                return pb.ModelReadyResponse(ready=False)  # in the repository: not loaded, or no such version yet
            return pb.ModelReadyResponse(ready=not self.draining)

        return await self._call(request, context, ready)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ServerMetadataResponse(name="ponder", version=__version__, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        def metadata(request: Any) -> Any:
            mv = self.repo.find(request.name, request.version)
            tensor = pb.ModelMetadataResponse.TensorMetadata
            inputs, outputs = _signature(mv)
            return pb.ModelMetadataResponse(
                name=mv.name, versions=[v for v, m in self.repo.models[mv.name].items() if m.ready],
                platform="onnxruntime_onnx",
                inputs=[tensor(name=n, datatype=d, shape=s) for n, d, s in inputs],
                outputs=[tensor(name=n, datatype=d, shape=s) for n, d, s in outputs])

        return await self._call(request, context, metadata)

    async def ModelConfig(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._call(request, context, self._config)

    def _config(self, request: Any) -> Any:
        mv = self.repo.find(request.name, request.version)
        engine = mv.engine
        assert engine is not None
        settings = mv.settings
        inputs, outputs = _signature(mv)
        params = {"act_threshold": engine.default_threshold, "n_layers": engine.n_layers,
                  "max_seq_len": engine.max_seq_len, "vocab_size": engine.vocab_size,
                  "tokenizer": "byte" if engine.byte_level else "word", "version": mv.version,
                  "halting": engine.metadata.get("halting", {}).get("name", ""),
                  "norm": engine.metadata.get("norm", {}).get("name", ""),
                  "precision": engine.metadata.get("precision", "fp32"),  # exported before --precision: float32
                  "max_batch_tokens": settings.max_batch_tokens,
                  "generation": (f"inputs {', '.join(f'{k} ({v} [1])' for k, v in TEXT_INPUTS.items())}; "
                                 f"text_input required; sampling_parameters a JSON object of "
                                 f"{', '.join(SAMPLING_KEYS)}; outputs {', '.join(TEXT_OUTPUTS)}"
                                 if engine.can_generate else "none: exported without its decode graph")}
        # with max_batch_size > 0, Triton's dims leave out the batch dimension (the first)
        cfg = pb.ModelConfig(
            name=mv.name, platform="onnxruntime_onnx", backend="onnxruntime", max_batch_size=settings.max_batch_size,
            input=[pb.ModelInput(name=n, data_type=_TYPES[d], dims=s[1:]) for n, d, s in inputs],
            output=[pb.ModelOutput(name=n, data_type=_TYPES[d], dims=s[1:]) for n, d, s in outputs],
            dynamic_batching=pb.ModelDynamicBatching(
                preferred_batch_size=[settings.max_batch_size],
                max_queue_delay_microseconds=settings.max_queue_delay_us, preserve_ordering=True,
                default_queue_policy=pb.ModelQueuePolicy(max_queue_size=settings.max_queue)))
        for key, value in params.items():
            cfg.parameters[key].string_value = str(value)
        return pb.ModelConfigResponse(config=cfg)

    async def ModelStatistics(self, request: Any, context: Any) -> Any:  # noqa: N802
        def statistics(request: Any) -> Any:
            chosen = self.repo.versions(request.name, request.version) if request.name else self.repo.all_versions()
            return pb.ModelStatisticsResponse(model_stats=[_stats(v) for v in chosen])

        return await self._call(request, context, statistics)

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:  # noqa: N802
        index = pb.RepositoryIndexResponse.ModelIndex
        models = [index(name=v.name, version=v.version, state="READY" if v.ready else "UNAVAILABLE",
                        reason=v.error or "") for v in self.repo.all_versions() if v.ready or not request.ready]
        if not request.ready:  # the models in the repository that are not loaded (explicit model control)
            models += [index(name=name, state="UNAVAILABLE", reason="not loaded")
                       for name in self.repo.model_names(quiet=True) if name not in self.repo.models]
        return pb.RepositoryIndexResponse(models=models)

    # -- model control (Triton's model repository extension) ----------------------------------------------------
    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._control(self.control.load, request, context, pb.RepositoryModelLoadResponse)

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._control(self.control.unload, request, context, pb.RepositoryModelUnloadResponse)

    async def _control(self, action: Any, request: Any, context: Any, response: Any) -> Any:
        try:
            await action(_control_name(request))
        except Exception as exc:
            await context.abort(*status_of(exc))
        return response()

    # -- inference ---------------------------------------------------------------------------------------------
    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        try:
            return [response async for response in self.answers(request, context, streaming=False)][-1]
        except Exception as exc:
            await context.abort(*status_of(exc))

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:  # noqa: N802
        """Each request in the stream answers in order: one response, or one per token when generating.
        A refused request answers with ``error_message`` and the stream goes on (as Triton does)."""
        async for request in request_iterator:
            try:
                async for response in self.answers(request, context, streaming=True):
                    yield pb.ModelStreamInferResponse(infer_response=response)
            except Exception as exc:
                yield pb.ModelStreamInferResponse(error_message=status_of(exc)[1])

    async def answers(self, request: Any, context: Any, streaming: bool) -> AsyncIterator[Any]:
        """Every ModelInferResponse to one request (several when it streams a generation), for any front end:
        ``context`` needs only ``time_remaining()``. Raises what refuses the request (:func:`status_of` maps it);
        counts it in the statistics and metrics whatever happens, a caller that stops reading as CANCELLED."""
        start = time.perf_counter()
        mv, status = None, grpc.StatusCode.CANCELLED  # unless it ends otherwise: the client left
        self.metrics.started()
        try:
            if isinstance(request, Undecodable):
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid ModelInferRequest: "
                                                                     f"{request.error}")
            mv = self.repo.find(request.model_name, request.model_version)
            async for response, _ in self._answer(mv, request, context, start, streaming):
                yield response
            status = grpc.StatusCode.OK
        except Exception as exc:
            status = code_of(exc)
            raise
        finally:
            self._finished(mv, request, status, start)

    async def _answer(self, mv: ModelVersion, request: Any, context: Any, start: float,
                      streaming: bool) -> AsyncIterator[tuple[Any, ModelRun]]:
        """The response(s) to one request: parsed and checked, queued, computed, recorded."""
        assert mv.engine is not None
        job, input_s = _timed(parse, request, mv.engine)
        scheduler = self._scheduler(mv)
        self.limits.check(job, mv.engine, scheduler.settings)
        deadline = deadline_of(context)
        if not job.generates:
            scored = await scheduler.score(job.ids, job.threshold, deadline)
            run = job.scored(scored.result, batch_size=scored.batch_size, batch_layers=scored.batch_layers)
            response, output_s = _timed(respond, request, mv.name, mv.version, run, queue_s=scored.queue_s,
                                        server_s=time.perf_counter() - start)
            self._record(mv, run, start, scored.queue_s, input_s, output_s)
            yield response, run
            return
        stream = scheduler.generate(job.prompt, job.sampling, job.threshold, deadline)
        tokens, output_s = [], 0.0
        async for token in stream.tokens():
            tokens.append(token)
            if streaming and job.stream:
                run, seconds = _timed(job.token, token, tokens)
                response, more = _timed(respond, request, mv.name, mv.version, run,
                                        queue_s=stream.queue_s if token.index == 0 else 0.0,
                                        server_s=time.perf_counter() - start)
                output_s += seconds + more
                yield response, run
        if not (streaming and job.stream):
            run = job.generated(tokens)
            response, output_s = _timed(respond, request, mv.name, mv.version, run, queue_s=stream.queue_s,
                                        server_s=time.perf_counter() - start)
            yield response, run
        self._record(mv, job.generated(tokens), start, stream.queue_s, input_s, output_s)

    def _record(self, mv: ModelVersion, run: ModelRun, start: float, queue_s: float, input_s: float,
                output_s: float) -> None:
        total = time.perf_counter() - start
        mv.stats.record(ok=True, total_s=total, queue_s=queue_s, input_s=input_s, compute_s=run.compute_s,
                        output_s=output_s, batch=run.batch)
        self.metrics.inference(mv.name, mv.version, rows=run.batch, total_s=total, queue_s=queue_s,
                               compute_s=run.compute_s, layers=run.layer_counts())

    def _finished(self, mv: ModelVersion | None, request: Any, status: grpc.StatusCode, start: float) -> None:
        seconds = time.perf_counter() - start
        name = mv.name if mv is not None else "(unknown)"  # unknown names must not grow the label sets
        self.metrics.finished(name, mv.version if mv is not None else "", status.name, seconds)
        if mv is not None and status != grpc.StatusCode.OK:
            mv.stats.record(ok=False, total_s=seconds)


def _control_name(request: Any) -> str:
    if isinstance(request, Undecodable):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid message: {request.error}")
    if not request.model_name:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "model_name is empty: name the model to load or unload")
    return request.model_name


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
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


def method_handlers(servicer: InferenceServicer) -> Any:
    """grpc's handlers for every method of the service, with deserializers that turn a message protobuf cannot
    parse into :class:`Undecodable` (so it answers INVALID_ARGUMENT)."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        make = grpc.stream_stream_rpc_method_handler if method.client_streaming else \
            grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(getattr(servicer, method.name), request_deserializer=_lenient(request_type),
                                     response_serializer=response_type.SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


def _lenient(message_type: Any) -> Any:
    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except Exception as exc:  # protobuf's DecodeError, or a RecursionError on deep nesting
            return Undecodable(f"{type(exc).__name__}: {str(exc)[:200]}")

    return parse
