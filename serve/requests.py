"""One inference request: checked against the model (every refusal names its field), run, answered.

Two kinds of request, told apart by their inputs:
- ``input_ids`` (INT64 [batch, seq]): one forward pass; outputs ``logits`` and ``token_depth``.
- ``text_input`` (BYTES, one UTF-8 string), as Triton's LLM backends take it, with the optional ``stream`` (BOOL),
  ``sampling_parameters`` (BYTES: a JSON object of ``ponder.generation.SAMPLING_KEYS``) and
  ``exclude_input_in_output`` (BOOL): generation through the model's decode graph (its KV cache). Outputs
  ``text_output`` and ponder's ``token_ids`` and ``token_depth``. With ``stream`` true over ModelStreamInfer it
  answers once per token (the new text only), the last response marked ``triton_final_response``; otherwise once,
  with the prompt before the new text unless ``exclude_input_in_output``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from ponder.errors import ConfigError, PonderError
from ponder.generation import SamplingParams, Token, check_prompt
from ponder.limits import check_threshold
from ponder.serve import inference_pb2 as pb
from ponder.serve.engine import Engine
from ponder.serve.protocol import RequestError, add_output, cut, decode_tensor, echo, invalid, read_number, set_param

IDS_OUTPUTS = ("logits", "token_depth")
TEXT_OUTPUTS = ("text_output", "token_ids", "token_depth")
# the generation request's inputs and their datatypes (text_input required, the rest optional)
TEXT_INPUTS = {"text_input": "BYTES", "stream": "BOOL", "sampling_parameters": "BYTES",
               "exclude_input_in_output": "BOOL"}


@dataclass
class ModelRun:
    """What one run of the model produced (a forward pass, a whole generation, or one generated token), for the
    response and the statistics."""

    outputs: dict[str, np.ndarray]
    layers_executed: int
    mean_token_depth: float
    compute_s: float
    batch: int = 1
    params: dict[str, Any] = field(default_factory=dict)
    step_layers: list[int] = field(default_factory=list)  # layers executed per model run, when there are several

    def layer_counts(self) -> list[int]:
        return self.step_layers or [self.layers_executed]


@dataclass
class Job:
    engine: Engine
    threshold: float
    ids: np.ndarray | None = None  # [batch, seq] for a forward pass
    prompt: list[int] | None = None  # token ids for generation
    prompt_text: bytes = b""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False
    exclude_input: bool = False
    wanted: tuple[str, ...] = ()

    @property
    def generates(self) -> bool:
        return self.prompt is not None

    @property
    def streams(self) -> bool:
        return self.generates and self.stream

    def scored(self, result: Any, *, batch_size: int, batch_layers: int) -> ModelRun:
        """The response of a forward pass (``result``: its InferResult from a run it may have shared)."""
        outputs = {"logits": result.logits, "token_depth": result.token_depth.astype(np.int64)}
        return ModelRun(self._pick(outputs), result.layers_executed, result.mean_token_depth,
                        result.compute_ms / 1e3, batch=int(self.ids.shape[0]),
                        params={"batch_size": batch_size, "batch_layers_executed": batch_layers})

    def generated(self, tokens: list[Token]) -> ModelRun:
        """The one response of a whole generation (ModelInfer, or a stream request without ``stream``)."""
        text = b"".join(t.text for t in tokens)
        layers = [t.layers_executed for t in tokens]
        outputs = {"text_output": _bytes_array(text if self.exclude_input else self.prompt_text + text),
                   "token_ids": np.array([t.token_id for t in tokens], dtype=np.int64),
                   "token_depth": np.array([t.depth for t in tokens], dtype=np.int64)}
        return ModelRun(self._pick(outputs), max(layers), float(np.mean([t.depth for t in tokens])),
                        sum(t.compute_s for t in tokens), step_layers=layers,
                        params={**self._totals(tokens), "triton_final_response": True})

    def token(self, token: Token, done: list[Token]) -> ModelRun:
        """The response of one generated token (ModelStreamInfer with ``stream``); ``done``: every token so far,
        this one included (the final response carries the totals)."""
        outputs = {"text_output": _bytes_array(token.text), "token_ids": np.array([token.token_id], np.int64),
                   "token_depth": np.array([token.depth], dtype=np.int64)}
        params: dict[str, Any] = {"token_index": token.index, "prefill": token.prefill,
                                  "triton_final_response": token.final}
        if token.final:
            params.update(self._totals(done))
        return ModelRun(self._pick(outputs), token.layers_executed, float(token.depth), token.compute_s,
                        params=params)

    @staticmethod
    def _totals(tokens: list[Token]) -> dict[str, Any]:
        return {"tokens_generated": len(tokens), "finish_reason": tokens[-1].finish_reason or "length",
                "total_layers_executed": sum(t.layers_executed for t in tokens),
                "total_compute_ms": sum(t.compute_s for t in tokens) * 1e3,
                "first_token_ms": tokens[0].compute_s * 1e3}

    def _pick(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v for k, v in outputs.items() if not self.wanted or k in self.wanted}


def _bytes_array(data: bytes) -> np.ndarray:
    out = np.empty(1, dtype=np.object_)
    out[0] = data
    return out


def parse(request: Any, engine: Engine) -> Job:
    """Check a ModelInferRequest against ``engine``'s model; INVALID_ARGUMENT names whatever is wrong."""
    threshold = _threshold(request, engine)
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise invalid(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: send one per "
                      f"input, or none and use contents")
    names = [t.name for t in request.inputs]
    if len(set(names)) != len(names):
        raise invalid(f"inputs: {echo(sorted({n for n in names if names.count(n) > 1}))} sent more than once")
    accepted = "input_ids (INT64 [batch, seq]) to score, or text_input (BYTES [1]) to generate"
    if "text" in names and "text_input" not in names:
        raise invalid("input 'text' is now 'text_input' (with max_tokens and the other sampling options in the "
                      "BYTES input sampling_parameters, a JSON object), as Triton's LLM backends name them")
    if "input_ids" in names and "text_input" in names:
        raise invalid(f"inputs: send {accepted}, not both")
    if "input_ids" in names:
        if len(names) != 1:
            raise invalid(f"inputs: input_ids goes alone, got {echo(names)}")
        tensor = request.inputs[0]
        field_name = "input 'input_ids'"
        if tensor.datatype != "INT64":
            raise invalid(f"{field_name}: datatype is {echo(tensor.datatype)}, expected 'INT64'")
        ids = decode_tensor(tensor, raw[0] if raw else None, field_name)
        _check_ids(ids, engine, field_name)
        return Job(engine, threshold, ids=ids, wanted=_wanted(request, IDS_OUTPUTS))
    if "text_input" in names:
        return _generation(request, engine, threshold, raw)
    raise invalid(f"inputs: expected {accepted}; got {echo(names)}")


def _generation(request: Any, engine: Engine, threshold: float, raw: list[bytes]) -> Job:
    values: dict[str, Any] = {}
    for i, tensor in enumerate(request.inputs):
        field_name = f"input {echo(tensor.name)}"
        if tensor.name not in TEXT_INPUTS:
            raise invalid(f"{field_name} is unknown beside text_input; generation takes {', '.join(TEXT_INPUTS)}")
        if tensor.datatype != TEXT_INPUTS[tensor.name]:
            raise invalid(f"{field_name}: datatype is {echo(tensor.datatype)}, expected {TEXT_INPUTS[tensor.name]!r}")
        array = decode_tensor(tensor, raw[i] if raw else None, field_name).reshape(-1)
        if array.size != 1:
            raise invalid(f"{field_name}: expected one element, got shape {echo(list(tensor.shape))}")
        values[tensor.name] = array[0]
    try:
        engine.check_generation()
    except PonderError as exc:
        raise invalid(cut(str(exc))) from None
    data = bytes(values["text_input"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(f"input 'text_input' is not valid UTF-8 (byte {exc.start}: {data[exc.start:exc.start + 1]!r}); "
                      "send the prompt as UTF-8 text") from None
    prompt = [int(i) for i in engine.tokenizer.encode(text)]
    try:
        check_prompt(prompt, engine.max_seq_len, engine.vocab_size)
        sampling = SamplingParams.from_json(bytes(values.get("sampling_parameters", b"{}")))
    except ConfigError as exc:
        field_name = "text_input" if "prompt" in str(exc) else "sampling_parameters"
        raise invalid(f"input {field_name!r}: {cut(str(exc))}") from None
    return Job(engine, threshold, prompt=prompt, prompt_text=data, sampling=sampling,
               stream=bool(values.get("stream", False)), exclude_input=bool(values.get("exclude_input_in_output",
                                                                                        False)),
               wanted=_wanted(request, TEXT_OUTPUTS))


def _threshold(request: Any, engine: Engine) -> float:
    value = read_number(request.parameters, "act_threshold")
    if value is None:
        return engine.default_threshold
    try:
        return check_threshold(value, "parameter 'act_threshold'")
    except ConfigError as exc:
        raise invalid(cut(str(exc))) from None


def _check_ids(ids: np.ndarray, engine: Engine, field_name: str) -> None:
    if ids.ndim != 2:
        raise invalid(f"{field_name}: shape {echo(list(ids.shape))} has rank {ids.ndim}, expected rank 2 [batch, seq]")
    batch, seq = ids.shape
    if batch < 1:
        raise invalid(f"{field_name}: batch size is 0, expected at least 1")
    if not 2 <= seq <= engine.max_seq_len:
        raise invalid(f"{field_name}: sequence length {seq} is outside [2, {engine.max_seq_len}] (the model's "
                      f"max_seq_len)")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= engine.vocab_size:
        raise invalid(f"{field_name}: token ids must be in [0, {engine.vocab_size}), got values in [{low}, {high}]")


def _wanted(request: Any, known: tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(o.name for o in request.outputs)
    for name in names:
        if name not in known:
            raise invalid(f"outputs: {echo(name)} is not an output of this request; choose from {', '.join(known)}")
    return names


def respond(request: Any, model_name: str, version: str, step: ModelRun, *, queue_s: float, server_s: float) -> Any:
    """The ModelInferResponse for one model run: outputs as raw contents, ponder's figures as parameters."""
    response = pb.ModelInferResponse(model_name=model_name, model_version=version, id=request.id)
    for name, array in step.outputs.items():
        add_output(response, name, array)
    params = response.parameters
    set_param(params, "layers_executed", int(step.layers_executed))
    set_param(params, "mean_token_depth", float(step.mean_token_depth))
    set_param(params, "compute_ms", step.compute_s * 1e3)
    set_param(params, "queue_ms", queue_s * 1e3)
    set_param(params, "server_ms", server_s * 1e3)
    for key, value in step.params.items():
        set_param(params, key, value)
    return response


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server, checked before anything is computed: its rows and tokens (the
    model's batch settings), the tokens a generation may ask for, and the size of the response it would get."""

    max_tokens: int = 1024  # per generation (--max-tokens)
    max_message_bytes: int = 64 * 1024 * 1024  # --max-message-mb

    def check(self, job: Job, engine: Engine, settings: Any) -> None:
        """INVALID_ARGUMENT (beyond what this server ever takes) or RESOURCE_EXHAUSTED (a response too large to
        send), each naming the limit and the setting that raises it."""
        if job.generates:
            if job.sampling.max_tokens > self.max_tokens:
                raise invalid(f"sampling_parameters: max_tokens = {job.sampling.max_tokens} is over this server's "
                              f"limit of {self.max_tokens} (ponder serve --max-tokens raises it)")
            return
        assert job.ids is not None
        rows, seq = job.ids.shape
        if rows > settings.max_batch_size:
            raise invalid(f"input 'input_ids': batch size {rows} is over the model's max_batch_size "
                          f"{settings.max_batch_size} (ponder serve --max-batch-size, or max_batch_size in the "
                          f"model's config.json, raises it)")
        if rows * seq > settings.max_batch_tokens:
            raise invalid(f"input 'input_ids': {rows} x {seq} = {rows * seq} tokens is over the model's "
                          f"max_batch_tokens {settings.max_batch_tokens} (ponder serve --max-batch-tokens, or "
                          f"max_batch_tokens in the model's config.json, raises it)")
        size = rows * seq * ((engine.vocab_size * 4 if "logits" in (job.wanted or IDS_OUTPUTS) else 0) + 8)
        if size > self.max_message_bytes - 4096:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the response would be {size / 2**20:.1f} MiB, over the message limit of "
                               f"{self.max_message_bytes / 2**20:.0f} MiB (ponder serve --max-message-mb raises it; "
                               f"or ask only for output token_depth, or send fewer rows)")
