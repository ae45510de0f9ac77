"""The Open Inference Protocol v2 over HTTP/REST, as Triton and KServe serve it on port 8000.

aiohttp serves it on the gRPC server's event loop: a well-kept asyncio HTTP server that runs on a loop it is
given (no second loop, no thread), with streaming responses for server-sent events. Every route asks the same
:class:`~ponder.serve.servicer.InferenceServicer` the gRPC front end asks, through the same messages
(``serve/rest.py`` turns JSON into them and back), so both protocols share the scheduler, the limits, the
statistics and the error mapping (HTTP status + ``{"error": message}``).
"""

from __future__ import annotations

import json
import ssl
from typing import Any

from aiohttp import web

from ponder.serve import inference_pb2 as pb
from ponder.serve.listen import TLSFiles
from ponder.serve.rest import (
    HEADER_LENGTH,
    error_body,
    generate_request,
    generate_response,
    infer_request,
    infer_response,
    message_json,
    split_body,
)
from ponder.serve.servicer import InferenceServicer, status_of

JSON = "application/json"


class _Aborted(Exception):
    def __init__(self, code: Any, message: str) -> None:
        super().__init__(message)
        self.status = (code, message)


class _Context:
    """What the servicer needs of a call: no deadline over HTTP; an abort raises."""

    def time_remaining(self) -> None:
        return None

    async def abort(self, code: Any, message: str) -> None:
        raise _Aborted(code, message)


def _error(exc: BaseException) -> web.Response:
    status = exc.status if isinstance(exc, _Aborted) else status_of(exc)
    code, body = error_body(status)
    return web.Response(status=code, body=body, content_type=JSON)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(data).encode(), content_type=JSON)


class Routes:
    def __init__(self, servicer: InferenceServicer) -> None:
        self.servicer = servicer

    async def _ask(self, method: str, request: Any) -> Any:
        return await getattr(self.servicer, method)(request, _Context())

    @staticmethod
    def _model(request: web.Request) -> tuple[str, str]:
        return request.match_info["name"], request.match_info.get("version", "")

    async def live(self, request: web.Request) -> web.Response:
        reply = await self._ask("ServerLive", pb.ServerLiveRequest())
        return _json({"live": reply.live}, 200 if reply.live else 503)

    async def ready(self, request: web.Request) -> web.Response:
        reply = await self._ask("ServerReady", pb.ServerReadyRequest())
        return _json({"ready": reply.ready}, 200 if reply.ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json(message_json(await self._ask("ServerMetadata", pb.ServerMetadataRequest())))

    async def _model_reply(self, method: str, message: Any) -> tuple[Any, web.Response | None]:
        """Ask the servicer; a refusal becomes the HTTP error to answer instead."""
        try:
            return await self._ask(method, message), None
        except Exception as exc:
            return None, _error(exc)

    async def model_metadata(self, request: web.Request) -> web.Response:
        name, version = self._model(request)
        reply, error = await self._model_reply("ModelMetadata", pb.ModelMetadataRequest(name=name, version=version))
        if error:
            return error
        body = message_json(reply)
        # OIP's JSON metadata may carry parameters (gRPC's message has no field for them: ModelConfig does)
        config, error = await self._model_reply("ModelConfig", pb.ModelConfigRequest(name=name, version=version))
        if config is not None and "precision" in config.config.parameters:
            body["parameters"] = {"precision": config.config.parameters["precision"].string_value}
        return _json(body)

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = self._model(request)
        reply, error = await self._model_reply("ModelReady", pb.ModelReadyRequest(name=name, version=version))
        return error or _json({"name": name, "ready": reply.ready}, 200 if reply.ready else 503)

    async def model_config(self, request: web.Request) -> web.Response:
        name, version = self._model(request)
        reply, error = await self._model_reply("ModelConfig", pb.ModelConfigRequest(name=name, version=version))
        return error or _json(message_json(reply.config))  # Triton answers the config itself

    async def statistics(self, request: web.Request) -> web.Response:
        name, version = request.match_info.get("name", ""), request.match_info.get("version", "")
        reply, error = await self._model_reply("ModelStatistics",
                                               pb.ModelStatisticsRequest(name=name, version=version))
        return error or _json(message_json(reply))

    async def index(self, request: web.Request) -> web.Response:
        try:
            data, _ = split_body(await request.read(), None)
        except Exception as exc:
            return _error(exc)
        reply = await self._ask("RepositoryIndex", pb.RepositoryIndexRequest(ready=bool(data.get("ready", False))))
        return _json([message_json(m) for m in reply.models])  # Triton answers the list itself

    async def load(self, request: web.Request) -> web.Response:
        return await self._control("RepositoryModelLoad", pb.RepositoryModelLoadRequest, request)

    async def unload(self, request: web.Request) -> web.Response:
        return await self._control("RepositoryModelUnload", pb.RepositoryModelUnloadRequest, request)

    async def _control(self, method: str, message: Any, request: web.Request) -> web.Response:
        _, error = await self._model_reply(method, message(model_name=request.match_info["name"]))
        return error or _json({})

    async def infer(self, request: web.Request) -> web.Response:
        name, version = self._model(request)
        try:
            self.servicer.repo.find(name, version)  # an unknown model is NOT_FOUND before its body is read
            data, binary = split_body(await request.read(), request.headers.get(HEADER_LENGTH))
            message, binary_outputs = infer_request(name, version, data, binary)
            answers = [r async for r in self.servicer.answers(message, _Context(), streaming=False)]
            body, header = infer_response(answers[-1], binary_outputs)
        except Exception as exc:
            return _error(exc)
        if header is None:
            return web.Response(body=body, content_type=JSON)
        return web.Response(body=body, content_type="application/octet-stream", headers={HEADER_LENGTH: str(header)})

    async def generate(self, request: web.Request) -> web.Response:
        name, version = self._model(request)
        try:
            self.servicer.repo.find(name, version)
            data, _ = split_body(await request.read(), None)
            message = generate_request(name, version, data, stream=False)
            answers = [r async for r in self.servicer.answers(message, _Context(), streaming=False)]
        except Exception as exc:
            return _error(exc)
        return _json(generate_response(answers[-1]))

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: one ``data:`` line per token (Triton's generate_stream); a refusal before the
        first token is an HTTP error, one after it a final ``data: {"error": ...}`` event."""
        name, version = self._model(request)
        try:
            self.servicer.repo.find(name, version)
            data, _ = split_body(await request.read(), None)
            message = generate_request(name, version, data, stream=True)
            answers = self.servicer.answers(message, _Context(), streaming=True)
            first = await answers.__anext__()
        except StopAsyncIteration:
            return _json({"error": "the generation ended without a token"}, 500)
        except Exception as exc:
            return _error(exc)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        await response.write(b"data: " + json.dumps(generate_response(first)).encode() + b"\n\n")
        try:
            async for answer in answers:
                await response.write(b"data: " + json.dumps(generate_response(answer)).encode() + b"\n\n")
        except Exception as exc:
            await response.write(b"data: " + json.dumps({"error": status_of(exc)[1]}).encode() + b"\n\n")
        finally:
            await answers.aclose()
        await response.write_eof()
        return response


def make_app(servicer: InferenceServicer, max_body_bytes: int) -> web.Application:
    """The OIP v2 routes, with Triton's extensions (config, statistics, repository index, generate)."""
    r = Routes(servicer)
    app = web.Application(client_max_size=max_body_bytes)
    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    app.router.add_get("/v2/health/live", r.live)
    app.router.add_get("/v2/health/ready", r.ready)
    app.router.add_get("/v2", r.server_metadata)
    app.router.add_get("/v2/models/stats", r.statistics)
    app.router.add_post("/v2/repository/index", r.index)
    app.router.add_post("/v2/repository/models/{name}/load", r.load)
    app.router.add_post("/v2/repository/models/{name}/unload", r.unload)
    for base in (model, versioned):
        app.router.add_get(base, r.model_metadata)
        app.router.add_get(base + "/ready", r.model_ready)
        app.router.add_get(base + "/config", r.model_config)
        app.router.add_get(base + "/stats", r.statistics)
        app.router.add_post(base + "/infer", r.infer)
        app.router.add_post(base + "/generate", r.generate)
        app.router.add_post(base + "/generate_stream", r.generate_stream)
    return app


def ssl_context(tls: TLSFiles | None) -> ssl.SSLContext | None:
    """The same certificate (and client CA) as the gRPC front end."""
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.ca is not None:
        context.load_verify_locations(str(tls.ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def start_http(servicer: InferenceServicer, host: str, port: int, max_body_bytes: int,
                     tls: TLSFiles | None) -> tuple[web.AppRunner, int]:
    """Serve the routes on ``host:port`` (0 picks one); returns the runner (``cleanup()`` stops it) and the port.
    A client that disconnects cancels its request (its queued or generating work is dropped)."""
    runner = web.AppRunner(make_app(servicer, max_body_bytes), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context(tls), reuse_port=False)
    await site.start()
    sockets = getattr(site._server, "sockets", None) or []
    return runner, int(sockets[0].getsockname()[1]) if sockets else port
