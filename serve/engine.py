"""The ONNX Runtime engine for exported ponder models: load, infer, generate, describe.

No torch here: serving needs only onnxruntime, numpy and the model's files (the tokenizers come from the torch-free
``ponder.text``, the session setup from ``ponder.onnx_runtime``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ponder.errors import PonderError
from ponder.limits import check_threshold
from ponder.model_repository import config_paths
from ponder.onnx_runtime import open_session
from ponder.text import ByteTokenizer, tokenizer_from_json


@dataclass
class InferResult:
    logits: np.ndarray  # [batch, seq, vocab]
    layers_executed: int
    token_depth: np.ndarray  # [batch, seq]
    compute_ms: float

    @property
    def mean_token_depth(self) -> float:
        return float(self.token_depth.mean())


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ponder metadata of an exported model (JSON values decoded)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise PonderError(f"model file {str(path)!r} does not exist")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise PonderError(f"{str(path)!r} is not an ONNX model: {type(exc).__name__}: {exc}") from None
    out: dict[str, Any] = {}
    for prop in proto.metadata_props:
        try:
            out[prop.key] = json.loads(prop.value)
        except json.JSONDecodeError:
            out[prop.key] = prop.value
    if "ponder_version" not in out:
        raise PonderError(f"{str(path)!r} was not exported by ponder (no ponder metadata)")
    out["inputs"] = [(i.name, _shape(i.type)) for i in proto.graph.input]
    out["outputs"] = [(o.name, _shape(o.type)) for o in proto.graph.output]
    out["opset"] = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return out


def _shape(type_proto: Any) -> str:
    tensor = type_proto.tensor_type
    dims = [d.dim_param or str(d.dim_value) for d in tensor.shape.dim]
    import onnx

    return f"{onnx.TensorProto.DataType.Name(tensor.elem_type).lower()}[{', '.join(dims)}]"


class Engine:
    """One exported model on ONNX Runtime (CPU), with its tokenizer."""

    def __init__(self, path: str | Path, threads: int | None = None, spinning: bool = True) -> None:
        """``threads``: ONNX Runtime's intra-op threads (default: its own choice). ``spinning=False`` stops those
        threads busy-waiting between runs, which frees the CPU for a server's own threads."""
        self.path = Path(path)
        self.metadata = read_metadata(self.path)
        self.config = self._read_config()
        self.n_layers = int(self.metadata["n_layers"])
        self.max_seq_len = int(self.metadata["max_seq_len"])
        self.default_threshold = float(self.metadata["act_threshold"])
        self.session = open_session(self.path, threads, spinning=spinning)
        self.vocab_size = int(self.metadata["vocab_size"])
        self.tokenizer_spec = self.config.get("tokenizer") or self.metadata.get("tokenizer") or {"kind": "byte"}
        self.byte_level = self.tokenizer_spec.get("kind") == "byte"
        self._tokenizer_cache: Any = None

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (built on first use: a word vocabulary can be large)."""
        if self._tokenizer_cache is None:
            self._tokenizer_cache = self._tokenizer()
        return self._tokenizer_cache

    def _read_config(self) -> dict[str, Any]:
        for candidate in config_paths(self.path):
            if candidate.is_file():
                try:
                    return json.loads(candidate.read_text())
                except json.JSONDecodeError as exc:
                    raise PonderError(f"{str(candidate)!r} is not valid JSON: {exc}") from None
        return {}

    def _tokenizer(self) -> Any:
        spec = self.tokenizer_spec
        if self.byte_level:
            return ByteTokenizer()
        if "vocab" not in spec:
            raise PonderError(f"{str(self.path)!r} uses a word vocabulary, but no config.json with it lies beside it")
        return tokenizer_from_json(spec)

    def check_threshold(self, threshold: float | None) -> float:
        """``threshold`` (None: the model's default) as a float in (0, 1], or a ConfigError naming act_threshold."""
        return check_threshold(self.default_threshold if threshold is None else threshold, "act_threshold")

    def infer(self, input_ids: np.ndarray, threshold: float | None = None) -> InferResult:
        """Run the model on ``input_ids`` ([batch, seq] int64) at ``threshold`` (default: the trained one)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] < 1 or not 2 <= ids.shape[1] <= self.max_seq_len:
            raise PonderError(f"input_ids must be [batch >= 1, 2 <= seq <= {self.max_seq_len}], got {list(ids.shape)}")
        vocab = self.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            raise PonderError(f"input_ids must be token ids in [0, {vocab}), got values in [{ids.min()}, {ids.max()}]")
        feed = {"input_ids": ids, "act_threshold": np.array(self.check_threshold(threshold), dtype=np.float32)}
        start = time.perf_counter()
        logits, layers, depth = self.session.run(None, feed)
        return InferResult(logits, int(layers), depth, (time.perf_counter() - start) * 1e3)

    def generate(self, text: str, tokens: int = 32, threshold: float | None = None) -> dict[str, Any]:
        """Greedy next tokens after ``text``, with layers executed and latency per step."""
        ids = [int(i) for i in self.tokenizer.encode(text)]
        if not ids:
            raise PonderError("--text is empty")
        new, steps = [], []
        for token, result in self.generate_steps(ids, tokens, threshold):
            new.append(token)
            steps.append({"layers_executed": result.layers_executed,
                          "last_token_depth": int(result.token_depth[0, -1]), "compute_ms": result.compute_ms})
        return {"text": self.tokenizer.decode(new), "token_ids": new, "steps": steps}

    def generate_steps(self, ids: list[int], tokens: int, threshold: float | None = None
                       ) -> Iterator[tuple[int, InferResult]]:
        """Greedy decoding, one step at a time: yields (next token id, that step's result).

        The context is the last ``max_seq_len`` tokens; a one-token prompt is padded by repeating it,
        since the exported graph takes sequences of two or more."""
        ids = list(ids)
        for _ in range(tokens):
            window = ids[-self.max_seq_len:]
            if len(window) < 2:
                window = [window[0]] * (2 - len(window)) + window
            result = self.infer(np.array([window], dtype=np.int64), threshold)
            token = int(result.logits[0, -1].argmax())
            ids.append(token)
            yield token, result
