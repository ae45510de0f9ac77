"""The ONNX Runtime engine for exported ponder models: load, infer, generate, describe.

No torch here: serving needs only onnxruntime, numpy and the model's files (the tokenizers come from the torch-free
``ponder.text``, the session setup from ``ponder.onnx_runtime``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ponder.errors import PonderError
from ponder.generation import SamplingParams, Step, Token, check_prompt, generate, text_bytes
from ponder.limits import check_threshold
from ponder.model_repository import config_paths, outside_problem
from ponder.onnx_runtime import open_session
from ponder.text import ByteTokenizer, tokenizer_from_json

# A decode step at batch 1 runs hundreds of tiny operators (one new token): handing each to a second thread costs
# more than the thread gives. Measured on the demo model, 120 cached tokens, 2 cores: 0.53 ms per step on one thread,
# 0.80-0.93 ms on two (benchmarks/bench_generate.py; docs/generation.md).
DECODE_THREADS = 1


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

    def __init__(self, path: str | Path, threads: int | None = None, spinning: bool = True,
                 decode_threads: int | None = DECODE_THREADS, root: str | Path | None = None) -> None:
        """``threads``: ONNX Runtime's intra-op threads for scoring (default: its own choice). ``spinning=False``
        stops those threads busy-waiting between runs, which frees the CPU for a server's own threads.
        ``decode_threads``: the same for the decode graph (default 1, see DECODE_THREADS). ``root``: the model
        repository the model lies in, when it does: a config or decode graph beside the model that resolves (a
        link) outside it is refused (a PonderError), not read."""
        self.path = Path(path)
        self._runs: set[Any] = set()  # the RunOptions of the runs in flight (terminate_runs stops them)
        self._last_batch: Any = None  # the previous batched decode run: (each row's cache views, caches, mask)
        self.root = None if root is None else Path(root)
        self.metadata = read_metadata(self.path)
        self.config = self._read_config()
        self.n_layers = int(self.metadata["n_layers"])
        self.max_seq_len = int(self.metadata["max_seq_len"])
        self.default_threshold = float(self.metadata["act_threshold"])
        self.session = open_session(self.path, threads, spinning=spinning)
        self._check_graph(self.session, "the scoring graph", {"input_ids": ("tensor(int64)", 2)},
                          ["logits", "layers_executed", "token_depth"])
        self.vocab_size = int(self.metadata["vocab_size"])
        self.tokenizer_spec = self.config.get("tokenizer") or self.metadata.get("tokenizer") or {"kind": "byte"}
        self.byte_level = self.tokenizer_spec.get("kind") == "byte"
        self._tokenizer_cache: Any = None
        decode = self.metadata.get("decode_graph")
        if self.root is not None and isinstance(decode, str) and decode and (self.path.parent / decode).exists():
            self._check_inside(self.path.parent / decode)
        self.decode_session = self._open_decode(decode_threads, spinning)
        # the prefill (the whole prompt at once) has enough work per operator for the scoring graph's threads
        self.prefill_session = self._open_decode(threads, spinning) if decode_threads != threads else \
            self.decode_session
        if self.decode_session is not None:
            self._check_graph(self.decode_session, "the decode graph", {
                "input_ids": ("tensor(int64)", 2), "attention_mask": ("tensor(int64)", 2),
                **{i.name: ("tensor(float)", 4) for i in self.decode_session.get_inputs()
                   if i.name.startswith("past_key_values.")}})
            names = [o.name for o in self.decode_session.get_outputs()]
            self._past_names = [i.name for i in self.decode_session.get_inputs()
                                if i.name.startswith("past_key_values.")]
            presents = [n.replace("past_key_values.", "present.") for n in self._past_names]
            missing = {"logits", "token_depth", "layers_executed", *presents} - set(names)
            if missing:
                raise PonderError(f"the decode graph of {str(self.path)!r} lacks the outputs {sorted(missing)}")
            self._decode_outputs = ["logits", "token_depth", "layers_executed", *presents]
            heads_dim = self.metadata["model"]
            self._empty = np.zeros((1, heads_dim["n_heads"], 0, heads_dim["d_model"] // heads_dim["n_heads"]),
                                   dtype=np.float32)

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (built on first use: a word vocabulary can be large)."""
        if self._tokenizer_cache is None:
            self._tokenizer_cache = self._tokenizer()
        return self._tokenizer_cache

    def _read_config(self) -> dict[str, Any]:
        for candidate in config_paths(self.path):
            if candidate.is_file():
                self._check_inside(candidate)
                try:
                    config = json.loads(candidate.read_text(encoding="utf-8"))
                except json.JSONDecodeError as exc:
                    raise PonderError(f"{str(candidate)!r} is not valid JSON: {exc}") from None
                except (OSError, UnicodeDecodeError) as exc:
                    raise PonderError(f"{str(candidate)!r} cannot be read: {type(exc).__name__}: {exc}") from None
                if not isinstance(config, dict):
                    raise PonderError(f"{str(candidate)!r} holds a JSON {type(config).__name__}, not an object")
                return config
        return {}

    def _check_inside(self, path: Path) -> None:
        """A PonderError when ``path`` resolves outside the repository the model lies in (when it lies in one)."""
        problem = None if self.root is None else outside_problem(path, self.root)
        if problem is not None:
            raise PonderError(f"{str(path)!r} is not read: {problem}")

    def _check_graph(self, session: Any, what: str, feeds: dict[str, tuple[str, int]],
                     outputs: list[str] | None = None) -> None:
        """A PonderError naming what is wrong when ``session``'s graph does not take what the engine feeds it
        (``feeds``: name -> type and rank; and ``act_threshold``, a float of any shape, an input or an initializer
        it may override), needs an input it is not fed (an extra input with a default is fine), or does not answer
        ``outputs`` (in that order; logits a float of rank 3). Checked at load: such a graph would fail every
        request."""
        inputs = {i.name: i for i in session.get_inputs()}  # those without a default: each must be fed
        args = {**{o.name: o for o in session.get_outputs()},
                **{i.name: i for i in session.get_overridable_initializers()}, **inputs}
        wanted: dict[str, tuple[str, int | None]] = {**feeds, "act_threshold": ("tensor(float)", None)}
        problems = [f"needs the input {name!r}, which the server does not feed" for name in inputs
                    if name not in wanted]
        problems += [f"has no input {name!r}" for name in wanted if name not in args]
        if outputs is not None:
            if (got := [o.name for o in session.get_outputs()]) != outputs:
                problems.append(f"answers the outputs {got}, not {outputs}")
            wanted["logits"] = ("tensor(float)", 3)
        for name, (kind, rank) in wanted.items():
            arg = args.get(name)
            if arg is not None and (arg.type != kind or rank is not None and len(arg.shape or ()) != rank):
                problems.append(f"declares {name!r} a {arg.type} of rank {len(arg.shape or ())}, not {kind}"
                                + (f" of rank {rank}" if rank is not None else ""))
        if problems:
            raise PonderError(f"{what} of {str(self.path)!r} is not a graph ponder serves: it "
                              f"{'; it '.join(problems)}")

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
        logits, layers, depth = self._run(self.session, None, feed)
        return InferResult(logits, int(layers), depth, (time.perf_counter() - start) * 1e3)

    # -- generation through the decode graph (decode.onnx) -----------------------------------------------------

    @property
    def can_generate(self) -> bool:
        return self.decode_session is not None

    def _open_decode(self, threads: int | None, spinning: bool) -> Any:
        """The decode graph's session, or None for a model exported without one. Its file is named in the model's
        metadata and lies beside it (a name with a folder in it is not followed)."""
        name = self.metadata.get("decode_graph")
        if not (isinstance(name, str) and name and Path(name).name == name and (self.path.parent / name).is_file()):
            return None
        return open_session(self.path.parent / name, threads, spinning=spinning)

    def check_generation(self) -> None:
        """A PonderError unless this model can generate (it was exported with its decode graph)."""
        if not self.can_generate:
            raise PonderError(f"{str(self.path)!r} was exported without its decode graph (decode.onnx), which "
                              "generation runs on; export the checkpoint again with `ponder export` (without "
                              "--no-decode), which writes it beside the model")

    def decode_step(self, new_ids: list[int], past: list[np.ndarray] | None, threshold: float) -> Step:
        """One step of the decode graph for one sequence: the new tokens after ``past`` (None: an empty cache)."""
        n_past = 0 if past is None else past[0].shape[2]
        feed = {"input_ids": np.asarray([new_ids], dtype=np.int64),
                "attention_mask": np.ones((1, n_past + len(new_ids)), dtype=np.int64),
                "act_threshold": np.asarray(threshold, dtype=np.float32)}
        feed.update(zip(self._past_names, past if past is not None else [self._empty] * len(self._past_names),
                        strict=True))
        session = self.prefill_session if past is None and len(new_ids) > 1 else self.decode_session
        start = time.perf_counter()
        out = self._run(session, self._decode_outputs, feed)
        seconds = time.perf_counter() - start
        logits, depth, layers = out[0], out[1], out[2]
        return Step(logits[0, -1], out[3:], int(depth[0, -1]), int(layers), seconds)

    def generate_tokens(self, prompt: list[int], params: SamplingParams | None = None,
                        threshold: float | None = None) -> Iterator[Token]:
        """Generate after ``prompt`` (token ids) through the KV cache: each token with its depth and cost."""
        self.check_generation()
        params = (params or SamplingParams()).check()
        check_prompt(prompt, self.max_seq_len, self.vocab_size)
        threshold = self.check_threshold(threshold)
        return generate(lambda ids, past: self.decode_step(ids, past, threshold), list(prompt), params,
                        self.max_seq_len, text_bytes(self.tokenizer))

    def generate(self, text: str, params: SamplingParams | None = None,
                 threshold: float | None = None) -> dict[str, Any]:
        """Generate after ``text``: the new text, token ids, and per step its layers, depth and latency."""
        tokens = list(self.generate_tokens([int(i) for i in self.tokenizer.encode(text)], params, threshold))
        steps = [{"layers_executed": t.layers_executed, "token_depth": t.depth, "compute_ms": t.compute_s * 1e3,
                  "prefill": t.prefill} for t in tokens]
        return {"text": b"".join(t.text for t in tokens).decode("utf-8", "replace"),
                "token_ids": [t.token_id for t in tokens], "steps": steps,
                "finish_reason": tokens[-1].finish_reason if tokens else None}

    def _run(self, session: Any, outputs: list[str] | None, feed: dict[str, np.ndarray]) -> list[Any]:
        import onnxruntime as ort

        options = ort.RunOptions()
        self._runs.add(options)
        try:
            return session.run(outputs, feed, options)
        finally:
            self._runs.discard(options)

    def terminate_runs(self) -> None:
        """Stop the runs in flight (they raise in their threads): a server that stops does not wait for them."""
        for options in list(self._runs):
            options.terminate = True

    # -- batched runs (the server's scheduler) -----------------------------------------------------------------

    @cached_property
    def pads(self) -> bool:
        """The scoring graph takes ``row_lengths`` and ``row_threshold`` (exported since the scheduler came):
        rows of any lengths and thresholds share a run."""
        return _optional_inputs(self.session) >= {"row_lengths", "row_threshold"}

    @cached_property
    def decodes_rows(self) -> bool:
        """The decode graph takes ``row_threshold``: generations at different thresholds share a step."""
        return self.decode_session is not None and "row_threshold" in _optional_inputs(self.decode_session)

    def batch_key(self, ids: np.ndarray, threshold: float) -> tuple[Any, ...]:
        """Requests with equal keys may share one run of :meth:`infer_rows`: any two with a graph that pads, else
        the same sequence length and threshold (an older graph takes one threshold and no padding)."""
        return () if self.pads else (int(ids.shape[1]), float(threshold))

    def infer_rows(self, requests: list[tuple[np.ndarray, float]]) -> tuple[list[InferResult], int]:
        """Several requests (``ids [rows, seq]``, threshold; equal :meth:`batch_key`) in one run. Each gets its own
        rows' logits and depths, and as ``layers_executed`` its deepest token's depth (what it would have run
        alone); the second value is the layers the shared run executed."""
        if len(requests) == 1:
            result = self.infer(*requests[0])
            return [result], result.layers_executed
        if self.pads:
            batch = self._infer_padded(requests)
        else:
            batch = self.infer(np.concatenate([r[0] for r in requests]), requests[0][1])
        out, row = [], 0
        for r, _ in requests:
            depth = batch.token_depth[row:row + len(r), :r.shape[1]]
            out.append(InferResult(batch.logits[row:row + len(r), :r.shape[1]], int(depth.max()), depth,
                                   batch.compute_ms))
            row += len(r)
        return out, batch.layers_executed

    def _infer_padded(self, requests: list[tuple[np.ndarray, float]]) -> InferResult:
        """Rows of every request, right-padded to the longest; padding starts halted and never runs a layer."""
        longest = max(r.shape[1] for r, _ in requests)
        rows = sum(len(r) for r, _ in requests)
        ids = np.zeros((rows, longest), dtype=np.int64)
        lengths = np.empty(rows, dtype=np.int64)
        thresholds = np.empty(rows, dtype=np.float32)
        row = 0
        for r, threshold in requests:
            ids[row:row + len(r), :r.shape[1]] = r
            lengths[row:row + len(r)] = r.shape[1]
            thresholds[row:row + len(r)] = self.check_threshold(threshold)
            row += len(r)
        feed = {"input_ids": ids, "row_lengths": lengths, "row_threshold": thresholds}
        start = time.perf_counter()
        logits, layers, depth = self._run(self.session, None, feed)
        return InferResult(logits, int(layers), depth, (time.perf_counter() - start) * 1e3)

    def decode_rows(self, rows: list[tuple[list[int], list[np.ndarray] | None, float]]) -> list[Step]:
        """One step of several generations: ``(new_ids, past, threshold)`` each. Prefills (no cache yet) run
        together, their prompts left-padded (padding starts halted); the single new tokens of the others run
        together, their caches left-padded to the longest (the attention mask keeps the padding out, positions
        count real tokens only). A decode graph exported before ``row_threshold`` runs prefills one by one and the
        others in one run per threshold. Each Step's ``compute_s`` is the run it shared."""
        steps: list[Step | None] = [None] * len(rows)
        groups: dict[Any, list[int]] = {}
        for i, (ids, past, threshold) in enumerate(rows):
            prefill = past is None or len(ids) != 1
            if prefill and not self.decodes_rows:
                steps[i] = self.decode_step(ids, past, threshold)
            else:
                groups.setdefault((prefill, None if self.decodes_rows else threshold), []).append(i)
        for (prefill, _), members in groups.items():
            if len(members) == 1:
                steps[members[0]] = self.decode_step(*rows[members[0]])
                continue
            together = self._prefill_together if prefill else self._decode_together
            for i, step in zip(members, together([rows[i] for i in members]), strict=True):
                steps[i] = step
        return steps  # type: ignore[return-value]

    def _prefill_together(self, rows: list[tuple[list[int], Any, float]]) -> list[Step]:
        """Prompts of several generations in one run from empty caches, left-padded to the longest."""
        lengths = [len(ids) for ids, _, _ in rows]
        longest, b = max(lengths), len(rows)
        ids = np.zeros((b, longest), dtype=np.int64)
        mask = np.zeros((b, longest), dtype=np.int64)
        for j, (new, _, _) in enumerate(rows):
            ids[j, longest - len(new):] = new
            mask[j, longest - len(new):] = 1
        empty = self._empty[:, :, :0].repeat(b, axis=0)
        feed = {"input_ids": ids, "attention_mask": mask, **{name: empty for name in self._past_names},
                "row_threshold": np.asarray([t for _, _, t in rows], dtype=np.float32)}
        start = time.perf_counter()
        out = self._run(self.prefill_session, self._decode_outputs, feed)
        seconds = time.perf_counter() - start
        logits, depth = out[0], out[1]
        # each row reports its own layers (its deepest token), what it would have run alone
        return [Step(logits[j, -1], [np.ascontiguousarray(p[j:j + 1, :, longest - n:]) for p in out[3:]],
                     int(depth[j, -1]), int(depth[j].max()), seconds) for j, n in enumerate(lengths)]

    def _decode_together(self, rows: list[tuple[list[int], list[np.ndarray], float]]) -> list[Step]:
        """One decode run for rows of one new token each. When the rows are exactly those of the previous run, in
        its order (every generation went on, none joined or left), that run's outputs are fed back as they are:
        the cache is not copied again, the mask grows by one column."""
        b = len(rows)
        last = self._last_batch
        if last is not None and len(last[0]) == b and all(row[1] is views for row, views in
                                                          zip(rows, last[0], strict=True)):
            _, caches, mask = last
            mask = np.concatenate([mask, np.ones((b, 1), dtype=np.int64)], axis=1)
            lengths = [int(m.sum()) - 1 for m in mask]
        else:
            lengths = [past[0].shape[2] for _, past, _ in rows]
            longest = max(lengths)
            mask = np.ones((b, longest + 1), dtype=np.int64)
            for j, n in enumerate(lengths):
                mask[j, :longest - n] = 0
            caches = []
            for k in range(len(self._past_names)):
                first = rows[0][1][k]
                cache = np.zeros((b, first.shape[1], longest, first.shape[3]), dtype=first.dtype)
                for j, (_, past, _) in enumerate(rows):
                    cache[j, :, longest - lengths[j]:] = past[k][0]
                caches.append(cache)
        feed: dict[str, np.ndarray] = {"input_ids": np.asarray([ids for ids, _, _ in rows], dtype=np.int64),
                                       "attention_mask": mask, **dict(zip(self._past_names, caches, strict=True))}
        if self.decodes_rows:
            feed["row_threshold"] = np.asarray([t for _, _, t in rows], dtype=np.float32)
        else:
            feed["act_threshold"] = np.asarray(rows[0][2], dtype=np.float32)
        start = time.perf_counter()
        out = self._run(self.decode_session, self._decode_outputs, feed)
        seconds = time.perf_counter() - start
        logits, depth = out[0], out[1]
        total = mask.shape[1]
        views = [[p[j:j + 1, :, total - n - 1:] for p in out[3:]] for j, n in enumerate(lengths)]
        self._last_batch = (views, out[3:], mask)
        return [Step(logits[j, -1], views[j], int(depth[j, -1]), int(depth[j, -1]), seconds) for j in range(b)]


def _optional_inputs(session: Any) -> set[str]:
    """The inputs a session takes with a default (ONNX Runtime lists them apart from the required ones)."""
    return {i.name for i in session.get_overridable_initializers()}
