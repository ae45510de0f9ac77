"""Low-precision exports (``ponder export --precision``), and the quality bound that decides whether one ships.

- ``int8``: every matrix multiply by a weight (attention, MLP and LM head, in every ``If`` branch of both graphs)
  becomes ONNX Runtime's ``com.microsoft.DynamicQuantizeMatMul``: the weight stored in int8, symmetric, one scale
  per output channel; the activations quantized per call (uint8, one scale per tensor), the product accumulated in
  int32 (AVX-512 VNNI where the CPU has it) and scaled back to float32. Embedding, norms, attention scores, the
  halting unit stay float32.
- ``bf16``: the same weights stored in bfloat16 and widened to float32 when the session loads (a ``Cast`` ONNX
  Runtime folds once). ONNX Runtime's CPU kernels have no bf16 matrix multiply on x86 (a bf16 ``MatMul`` fails
  with NOT_IMPLEMENTED), so the file is smaller and the compute is float32's.

Neither matches PyTorch to 1e-4, so a low-precision export is held to a quality bound against its own float32
graph on validation text instead (:func:`check_quality`): perplexity within 1% and the same argmax on at least 99%
of tokens, at the trained threshold and at full depth. An export outside the bound is refused and nothing is
written.

:func:`lower_checked` is the export's step (``ponder.export.export_model`` calls it on its staged files). Torch-free,
below the graph builder (which uses :func:`drop_unused`).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ponder.errors import PonderError
from ponder.limits import MAX_PERPLEXITY_RATIO, MIN_ARGMAX_AGREEMENT, PRECISIONS

CONTRIB = "com.microsoft"


class QualityBoundError(PonderError):
    """A low-precision graph is outside the quality bound (the export refuses it)."""


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def drop_unused(proto: Any) -> None:
    """Remove the main graph's initializers that no node (at any depth) reads (an input's default stays)."""
    used = {name for node in _nodes(proto.graph) for name in node.input}
    used.update(o.name for o in proto.graph.output)
    used.update(i.name for i in proto.graph.input)
    kept = [i for i in proto.graph.initializer if i.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)


def _nodes(graph: Any) -> Iterator[Any]:
    """Every node of ``graph`` and of its subgraphs (the ``If`` branches), depth first."""
    from onnx import AttributeProto

    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                yield from _nodes(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _nodes(sub)


def weight_matmuls(proto: Any) -> tuple[list[Any], dict[str, Any]]:
    """The ``MatMul`` nodes (any depth) whose second input is a float32 matrix initializer of the main graph,
    and those initializers by name. A one-column weight (the halting unit, ``[d, 1]``) stays float32: it costs
    nothing and decides every token's depth."""
    from onnx import TensorProto

    inits = {i.name: i for i in proto.graph.initializer
             if i.data_type == TensorProto.FLOAT and len(i.dims) == 2 and min(i.dims) > 1}
    nodes = [n for n in _nodes(proto.graph) if n.op_type == "MatMul" and n.domain in ("", "ai.onnx")
             and n.input[1] in inits]
    return nodes, {n.input[1]: inits[n.input[1]] for n in nodes}


def quantize_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``weight`` [K, N] as int8 with one scale per output channel (column), symmetric: ``q * scale ~ weight``."""
    peak = np.abs(weight).max(axis=0)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(weight / scale), -127, 127).astype(np.int8)
    return q, scale


def lower(proto: Any, precision: str) -> dict[str, Any]:
    """Rewrite ``proto`` (an exported graph, in place) to ``precision``; returns what changed."""
    from onnx import TensorProto, helper, numpy_helper

    check_precision(precision)
    nodes, weights = weight_matmuls(proto)
    summary = {"precision": precision, "matmuls": len(nodes), "weights": len(weights),
               "weight_bytes_fp32": int(sum(4 * math.prod(w.dims) for w in weights.values()))}
    if precision == "fp32" or not nodes:
        return summary
    new_inits, casts = [], []
    for name, init in weights.items():
        value = numpy_helper.to_array(init)
        if precision == "int8":
            q, scale = quantize_int8(value)
            new_inits += [numpy_helper.from_array(q, f"{name}/int8"), numpy_helper.from_array(scale, f"{name}/scale"),
                          numpy_helper.from_array(np.zeros_like(q[0]), f"{name}/zero")]
        else:  # bf16 storage, widened once when the session loads
            bf16 = helper.make_tensor(f"{name}/bf16", TensorProto.BFLOAT16, value.shape,
                                      _bf16_bits(value).tobytes(), raw=True)
            new_inits.append(bf16)
            casts.append(helper.make_node("Cast", [f"{name}/bf16"], [name], to=TensorProto.FLOAT,
                                          name=f"{name}/widen"))
    if precision == "int8":
        for node in nodes:
            a, w = node.input[0], node.input[1]
            node.op_type, node.domain = "DynamicQuantizeMatMul", CONTRIB
            del node.input[:]
            node.input.extend([a, f"{w}/int8", f"{w}/scale", f"{w}/zero"])
        if not any(o.domain == CONTRIB for o in proto.opset_import):
            proto.opset_import.append(helper.make_opsetid(CONTRIB, 1))
    kept = [i for i in proto.graph.initializer if i.name not in weights]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept + new_inits)
    if casts:
        old = list(proto.graph.node)
        del proto.graph.node[:]
        proto.graph.node.extend(casts + old)
    stored = sum(i.ByteSize() for i in new_inits)
    summary["weight_bytes"] = int(stored)
    return summary


def _bf16_bits(value: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even."""
    bits = np.ascontiguousarray(value, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def set_metadata(path: Path, entries: dict[str, str]) -> None:
    """Set (replace) metadata entries of the model at ``path``."""
    import onnx

    proto = onnx.load(str(path))
    kept = [p for p in proto.metadata_props if p.key not in entries]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in entries.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def lower_file(path: Path, precision: str) -> dict[str, Any]:
    """:func:`lower` the model at ``path`` and write it back (checked by ``onnx.checker``)."""
    import onnx

    proto = onnx.load(str(path))
    summary = lower(proto, precision)
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return summary


def _token_stats(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and token count over ``ids`` [B, T] (logits [B, T, V])."""
    lg = logits[:, :-1].astype(np.float64)
    target = ids[:, 1:]
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    picked = np.take_along_axis(lg, target[..., None], -1)[..., 0]
    return float((lse - picked).sum()), int(target.size)


def quality(reference: Any, lowered: Any, samples: list[np.ndarray], thresholds: tuple[float, ...],
            feed_of=None) -> list[dict[str, Any]]:
    """Perplexity and argmax agreement of the ``lowered`` session against ``reference`` (float32) on ``samples``
    at each threshold. ``feed_of(ids, threshold)``: the feed (default: the scoring graph's)."""
    feed_of = feed_of or (lambda ids, t: {"input_ids": ids, "act_threshold": np.array(t, np.float32)})
    rows = []
    tokens = sum(ids.size for ids in samples)
    for threshold in thresholds:
        nll_ref = nll = 0.0
        predicted = same = 0
        for ids in samples:
            feed = feed_of(ids, threshold)
            ref, low = reference.run(["logits"], feed)[0], lowered.run(["logits"], feed)[0]
            (a, n), (b, _) = _token_stats(ref, ids), _token_stats(low, ids)
            nll_ref, nll, predicted = nll_ref + a, nll + b, predicted + n
            same += int((ref.argmax(-1) == low.argmax(-1)).sum())
        ppl_ref, ppl = math.exp(nll_ref / predicted), math.exp(nll / predicted)
        agreement = same / tokens
        rows.append({"threshold": threshold, "perplexity_fp32": ppl_ref, "perplexity": ppl,
                     "perplexity_ratio": ppl / ppl_ref, "argmax_agreement": agreement, "tokens": tokens,
                     "within_bound": ppl / ppl_ref <= MAX_PERPLEXITY_RATIO and agreement >= MIN_ARGMAX_AGREEMENT})
    return rows


def quality_inputs(model: Any, corpus_ids: Any) -> list[Any] | None:
    """Validation text for a low-precision export's quality bound: up to 16 rows of up to 128 tokens (two
    batches), or None without a corpus (the check samples serve)."""
    t = min(model.cfg.max_seq_len, 128)
    rows = 0 if corpus_ids is None else min(16, len(corpus_ids) // t)
    if rows < 2:
        return None
    ids = corpus_ids[: rows * t].view(rows, t).long()
    return [ids[: rows // 2], ids[rows // 2:]]


def lower_checked(model: Any, staged: Path, decode_staged: Path | None, precision: str,
                  samples: list[Any]) -> list[dict[str, Any]]:
    """Lower the staged graphs to ``precision`` and hold each to the quality bound against its float32 self (the
    decode graph on a prefill of each sample), at the trained threshold and full depth: a QualityBoundError outside
    it (the export raises it as an ExportError and writes nothing). Returns the measurements, which also go into
    each graph's metadata."""
    from ponder.onnx_runtime import open_session

    cfg = model.cfg

    def prefill_of(sess: Any):
        past = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values.")]

        def prefill(ids: Any, threshold: float) -> dict[str, Any]:
            empty = np.zeros((ids.shape[0], cfg.n_heads, 0, cfg.d_model // cfg.n_heads), np.float32)
            return {"input_ids": ids, "attention_mask": np.ones_like(ids),
                    "act_threshold": np.array(threshold, np.float32), **dict.fromkeys(past, empty)}
        return prefill

    thresholds = tuple(dict.fromkeys((model.dials.value("act_threshold"), 1.0)))
    ids = [s.numpy() for s in samples]
    rows: list[dict[str, Any]] = []
    for graph, path in (("scoring", staged), ("decode", decode_staged)):
        if path is None:
            continue
        reference = path.with_name(f"{path.stem}.fp32{path.suffix}")
        shutil.copyfile(path, reference)
        summary = lower_file(path, precision)
        fp32 = open_session(reference)
        measured = quality(fp32, open_session(path), ids, thresholds, None if graph == "scoring" else prefill_of(fp32))
        reference.unlink()
        for row in measured:
            row["graph"] = graph
        rows += measured
        worst = [r for r in measured if not r["within_bound"]]
        if worst:
            r = worst[0]
            raise QualityBoundError(
                f"the {precision} {graph} graph is outside the quality bound at threshold {r['threshold']:g}: "
                f"perplexity {r['perplexity']:.4f} against {r['perplexity_fp32']:.4f} in float32 "
                f"({r['perplexity_ratio'] - 1:+.2%}, at most {MAX_PERPLEXITY_RATIO - 1:+.0%}), the same argmax on "
                f"{r['argmax_agreement']:.2%} of {r['tokens']} tokens (at least {MIN_ARGMAX_AGREEMENT:.0%}); "
                f"nothing was written. Export in fp32 (the default) or a precision that keeps the bound")
        set_metadata(path, {"precision": precision, "quality": json.dumps(measured),
                            "lowered": json.dumps(summary)})
    return rows
