"""One inference request: checked against the model (every refusal names its field), run, answered.

Two kinds of request, told apart by their input:
- ``input_ids`` (INT64 [batch, seq]): one forward pass; outputs ``logits`` and ``token_depth``.
- ``text`` (BYTES, one element; byte-level models only): greedy generation of ``max_new_tokens`` tokens; outputs
  ``text`` (the new bytes), ``token_ids`` and ``token_layers`` (layers executed at each step). Streamed, it answers
  once per generated token.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ponder.errors import ConfigError
from ponder.limits import check_threshold
from ponder.serve import inference_pb2 as pb
from ponder.serve.engine import Engine
from ponder.serve.protocol import add_output, decode_tensor, invalid, read_number, set_param

DEFAULT_NEW_TOKENS = 16
MAX_NEW_TOKENS = 1024
IDS_OUTPUTS = ("logits", "token_depth")
TEXT_OUTPUTS = ("text", "token_ids", "token_layers")


@dataclass
class ModelRun:
    """What one run of the model produced (a forward pass, a whole generation, or one generated token), for the
    response and the statistics."""

    outputs: dict[str, np.ndarray]
    layers_executed: int
    mean_token_depth: float
    compute_s: float
    batch: int = 1
    executions: int = 1
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
    new_tokens: int = DEFAULT_NEW_TOKENS
    wanted: tuple[str, ...] = ()

    @property
    def generates(self) -> bool:
        return self.prompt is not None

    def run(self) -> ModelRun:
        """The whole request in one go (ModelInfer)."""
        if not self.generates:
            result = self.engine.infer(self.ids, self.threshold)
            outputs = {"logits": result.logits, "token_depth": result.token_depth.astype(np.int64)}
            return ModelRun(self._pick(outputs), result.layers_executed, result.mean_token_depth,
                            result.compute_ms / 1e3, batch=int(self.ids.shape[0]))
        tokens, layers, depths, compute = [], [], [], 0.0
        for step in self.steps():
            tokens.append(int(step.outputs["token_ids"][0]))
            layers.append(step.layers_executed)
            depths.append(step.mean_token_depth)
            compute += step.compute_s
        outputs = {"text": _bytes_array(bytes(tokens)), "token_ids": np.array(tokens, dtype=np.int64),
                   "token_layers": np.array(layers, dtype=np.int64)}
        return ModelRun(self._pick(outputs), sum(layers), float(np.mean(depths)), compute, executions=len(tokens),
                        params={"tokens_generated": len(tokens)}, step_layers=layers)

    def steps(self) -> Iterator[ModelRun]:
        """Generation one token at a time (ModelStreamInfer): each step's token, its layers and its latency."""
        assert self.prompt is not None
        for i, (token, result) in enumerate(self.engine.generate_steps(self.prompt, self.new_tokens, self.threshold)):
            outputs = {"text": _bytes_array(bytes([token])), "token_ids": np.array([token], dtype=np.int64),
                       "token_layers": np.array([result.layers_executed], dtype=np.int64)}
            last = i == self.new_tokens - 1
            yield ModelRun(self._pick(outputs), result.layers_executed, float(result.token_depth[0, -1]),
                           result.compute_ms / 1e3, params={"token_index": i, "triton_final_response": last})

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
    accepted = "input_ids (INT64 [batch, seq])" + (" or text (BYTES [1])" if engine.byte_level else "")
    if len(request.inputs) != 1:
        names = [t.name for t in request.inputs]
        raise invalid(f"inputs: expected exactly one input, {accepted}; got {names}")
    tensor = request.inputs[0]
    field_name = f"input {tensor.name!r}"
    if tensor.name == "input_ids":
        if tensor.datatype != "INT64":
            raise invalid(f"{field_name}: datatype is {tensor.datatype!r}, expected 'INT64'")
        ids = decode_tensor(tensor, raw[0] if raw else None, field_name)
        _check_ids(ids, engine, field_name)
        return Job(engine, threshold, ids=ids, wanted=_wanted(request, IDS_OUTPUTS))
    if tensor.name == "text" and engine.byte_level:
        if tensor.datatype != "BYTES":
            raise invalid(f"{field_name}: datatype is {tensor.datatype!r}, expected 'BYTES'")
        values = decode_tensor(tensor, raw[0] if raw else None, field_name).reshape(-1)
        if values.size != 1:
            raise invalid(f"{field_name}: expected one string, got shape {list(tensor.shape)}")
        prompt = list(bytes(values[0]))
        if not prompt:
            raise invalid(f"{field_name}: the text is empty")
        new_tokens = read_number(request.parameters, "max_new_tokens", integer=True)
        new_tokens = DEFAULT_NEW_TOKENS if new_tokens is None else int(new_tokens)
        if not 1 <= new_tokens <= MAX_NEW_TOKENS:
            raise invalid(f"parameter 'max_new_tokens' = {new_tokens} is outside [1, {MAX_NEW_TOKENS}]")
        return Job(engine, threshold, prompt=prompt, new_tokens=new_tokens, wanted=_wanted(request, TEXT_OUTPUTS))
    if tensor.name == "text":
        raise invalid(f"{field_name}: this model has a word vocabulary, so it takes input_ids only")
    raise invalid(f"{field_name} is unknown: the model takes {accepted}")


def _threshold(request: Any, engine: Engine) -> float:
    value = read_number(request.parameters, "act_threshold")
    if value is None:
        return engine.default_threshold
    try:
        return check_threshold(value, "parameter 'act_threshold'")
    except ConfigError as exc:
        raise invalid(str(exc)) from None


def _check_ids(ids: np.ndarray, engine: Engine, field_name: str) -> None:
    if ids.ndim != 2:
        raise invalid(f"{field_name}: shape {list(ids.shape)} has rank {ids.ndim}, expected rank 2 [batch, seq]")
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
            raise invalid(f"outputs: {name!r} is not an output of this request; choose from {', '.join(known)}")
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
