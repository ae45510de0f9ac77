"""A small client for ponder's server (any Open Inference Protocol v2 server, really), on ponder's own stubs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from ponder.errors import PonderError
from ponder.generation import SamplingParams
from ponder.serve import inference_pb2 as pb
from ponder.serve import inference_pb2_grpc as pb_grpc
from ponder.serve.protocol import output_arrays, param_value, set_param


@dataclass
class Reply:
    """One response: its outputs, ponder's parameters (layers_executed, compute_ms, ...) and the round trip."""

    model: str
    version: str
    outputs: dict[str, np.ndarray]
    params: dict[str, Any]
    round_trip_ms: float

    @property
    def layers_executed(self) -> int:
        return int(self.params["layers_executed"])


class ServerError(PonderError):
    """The server refused a call: carries the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"server answered {code.name}: {message}")
        self.code = code


class Client:
    def __init__(self, address: str = "127.0.0.1:8001", *, tls_ca: str | Path | None = None,
                 timeout: float = 30.0, max_message_mb: int = 64) -> None:
        self.address, self.timeout = address, timeout
        limit = max_message_mb * 1024 * 1024
        options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
        if tls_ca is not None:
            try:
                ca = Path(tls_ca).read_bytes()
            except OSError as exc:
                raise PonderError(f"--tls-ca {str(tls_ca)!r}: {exc.strerror or exc}") from None
            self.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(ca), options)
        else:
            self.channel = grpc.insecure_channel(address, options)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def _error(self, exc: Any) -> PonderError:
        code, details = exc.code(), exc.details()
        if code == grpc.StatusCode.UNAVAILABLE and "connect" in (details or "").lower():
            return ServerError(code, f"cannot reach {self.address} ({details})")
        return ServerError(code, details or "")

    # -- health and metadata -----------------------------------------------------------------------------------
    def live(self) -> bool:
        return self._call("ServerLive", pb.ServerLiveRequest()).live

    def ready(self) -> bool:
        return self._call("ServerReady", pb.ServerReadyRequest()).ready

    def model_ready(self, name: str, version: str = "") -> bool:
        return self._call("ModelReady", pb.ModelReadyRequest(name=name, version=version)).ready

    def server_metadata(self) -> Any:
        return self._call("ServerMetadata", pb.ServerMetadataRequest())

    def model_metadata(self, name: str, version: str = "") -> Any:
        return self._call("ModelMetadata", pb.ModelMetadataRequest(name=name, version=version))

    def model_config(self, name: str, version: str = "") -> dict[str, str]:
        """The model's configuration parameters as ponder's server reports them (n_layers, max_seq_len,
        vocab_size, tokenizer, act_threshold, norm, halting), as strings."""
        response = self._call("ModelConfig", pb.ModelConfigRequest(name=name, version=version))
        return {k: v.string_value for k, v in response.config.parameters.items()}

    def index(self) -> list[Any]:
        return list(self._call("RepositoryIndex", pb.RepositoryIndexRequest()).models)

    def default_model(self) -> str:
        """The one ready model, when there is exactly one; otherwise an error naming them."""
        names = sorted({m.name for m in self.index() if m.state == "READY"})
        if len(names) != 1:
            raise PonderError(f"the server has {len(names)} ready models ({', '.join(names) or 'none'}): "
                              f"choose one with --model")
        return names[0]

    def text_ids(self, model: str, text: str, version: str = "") -> list[int]:
        """``text`` as a byte-level model's token ids (its UTF-8 bytes). A model the server reports with another
        tokenizer (a word-level one) is refused, since its vocabulary is not here: turn the text into ids with
        ``ponder tokenize MODEL_OR_RUN --text ...`` and send those. A server without ModelConfig is taken to
        serve a byte-level model."""
        try:
            tokenizer = self.model_config(model, version).get("tokenizer") or "byte"
        except ServerError as exc:
            if exc.code != grpc.StatusCode.UNIMPLEMENTED:
                raise
            tokenizer = "byte"
        if tokenizer != "byte":
            raise PonderError(f"model {model!r} is {tokenizer}-level: text goes to it as token ids of its own "
                              f"vocabulary, which the server keeps, not as UTF-8 bytes. Turn the text into ids with "
                              f"`ponder tokenize MODEL_OR_RUN --text ...` (the exported model or its training run) "
                              f"and send them with --ids")
        return list(text.encode("utf-8"))

    # -- inference ---------------------------------------------------------------------------------------------
    def infer(self, model: str, input_ids: np.ndarray, *, threshold: float | None = None, version: str = "",
              typed: bool = False) -> Reply:
        """One forward pass on ``input_ids`` [batch, seq]; raw contents unless ``typed``."""
        ids = np.asarray(input_ids, dtype=np.int64)
        request = pb.ModelInferRequest(model_name=model, model_version=version)
        tensor = request.inputs.add(name="input_ids", datatype="INT64", shape=list(ids.shape))
        if typed:
            tensor.contents.int64_contents.extend(ids.reshape(-1).tolist())
        else:
            request.raw_input_contents.append(ids.astype("<i8").tobytes())
        if threshold is not None:
            set_param(request.parameters, "act_threshold", float(threshold))
        return self._reply(request)

    def generate_once(self, model: str, text: str, *, sampling: SamplingParams | None = None,
                      threshold: float | None = None, version: str = "") -> Reply:
        """Generation in one call (ModelInfer with ``text_input``): the new text only."""
        return self._reply(self._text_request(model, text, sampling, threshold, version, stream=False))

    def generate(self, model: str, text: str, *, sampling: SamplingParams | None = None,
                 threshold: float | None = None, version: str = "") -> Iterator[Reply]:
        """Generation over ModelStreamInfer with ``stream``: one reply per token, as the server produces it."""
        request = self._text_request(model, text, sampling, threshold, version, stream=True)
        last = time.perf_counter()
        try:
            for item in self.stub.ModelStreamInfer(iter([request]), timeout=self.timeout):
                if item.error_message:
                    raise ServerError(grpc.StatusCode.INVALID_ARGUMENT, item.error_message)
                now = time.perf_counter()
                yield self._parse(item.infer_response, (now - last) * 1e3)
                last = now
                if item.infer_response.parameters["triton_final_response"].bool_param:
                    return
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    @staticmethod
    def _text_request(model: str, text: str, sampling: SamplingParams | None, threshold: float | None,
                      version: str, *, stream: bool) -> Any:
        """A generation request as Triton's LLM clients send it."""
        request = pb.ModelInferRequest(model_name=model, model_version=version)
        request.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
            text.encode("utf-8"))
        request.inputs.add(name="stream", datatype="BOOL", shape=[1]).contents.bool_contents.append(stream)
        request.inputs.add(name="exclude_input_in_output", datatype="BOOL", shape=[1]).contents.bool_contents.append(
            True)
        request.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
            (sampling or SamplingParams()).to_json().encode())
        if threshold is not None:
            set_param(request.parameters, "act_threshold", float(threshold))
        return request

    def _reply(self, request: Any) -> Reply:
        start = time.perf_counter()
        response = self._call("ModelInfer", request)
        return self._parse(response, (time.perf_counter() - start) * 1e3)

    @staticmethod
    def _parse(response: Any, round_trip_ms: float) -> Reply:
        params = {k: param_value(v) for k, v in response.parameters.items()}
        return Reply(response.model_name, response.model_version, output_arrays(response), params, round_trip_ms)
