"""The exported decode graph (``decode.onnx``): one step of ``ponder.decode.decode_step`` through a KV cache,
assembled as the scoring graph is (``ponder.graph``): small traced pieces, copied in per layer under ``If`` nodes.

Per layer after the first: the full step while some new token runs (dense, or compacted to the running new tokens
when a long prompt's prefill has few of them left, chosen in the graph as the scoring graph chooses), else the
key/value fill of the halted tokens' frozen states.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ponder.contracts.halting import HaltState
from ponder.decode import KV, cached_layer, compacted_cached_layer, decode_rows, decode_tables, fill_layer
from ponder.graph import (
    STATE,
    TABLES,
    Choice,
    Epilogue,
    Running,
    _Builder,
    _trace,
    _typed,
    batching_inputs,
    per_row,
    tensors_of,
    uniform_template,
)
from ponder.model import PonderLM, additive_mask, halt_padding
from ponder.precision import drop_unused


class DecodePrologue(nn.Module):
    def __init__(self, model: PonderLM, window: int) -> None:
        super().__init__()
        self.model, self.window = model, window

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        m, cfg = self.model, self.model.cfg
        cos, sin, mask = decode_tables(attention_mask, input_ids.shape[1], cfg.d_model // cfg.n_heads,
                                       m.dials.value("rope_base"), cfg.n_heads, cfg.n_local_heads, self.window)
        mask = additive_mask(mask)  # once here, not in every layer's attention
        st = halt_padding(m.halting.init_state(m.embed(input_ids)),
                          attention_mask[:, attention_mask.shape[1] - input_ids.shape[1]:] == 0)
        return st.halted, st.cum, st.depth, st.output, st.hidden, torch.zeros((), dtype=torch.int64), cos, sin, mask


class _CachedStep(nn.Module):
    """One layer's full step through the cache, dense or (``compact``) on the running new tokens only."""

    def __init__(self, model: PonderLM, block: nn.Module, compact: bool) -> None:
        super().__init__()
        self.block, self.halting, self.compact = block, model.halting, compact

    def forward(self, halted, cum, depth, output, hidden, layers, cos, sin, mask, act_threshold, layer, past_key,
                past_value):
        state = HaltState(halted, cum, depth, output, hidden, cum, cum)
        past = KV(past_key, past_value)
        if self.compact:
            n = (~halted).sum(1).max().item()  # the most running new tokens in a row: rows per batch row
            torch._check(n >= 1)
            torch._check(n <= halted.shape[1])
            new, kv = compacted_cached_layer(self.block, self.halting, state, layer, act_threshold, cos, sin,
                                             decode_rows(halted, n, mask), past)
        else:
            new, kv = cached_layer(self.block, self.halting, state, layer, act_threshold, cos, sin, mask, past)
        return new.halted, new.cum, new.depth, new.output, new.hidden, layers + 1, kv.key, kv.value


class _Fill(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, hidden, cos, sin, past_key, past_value):
        return tuple(fill_layer(self.block, hidden, cos, sin, KV(past_key, past_value)))


class _Weighted(nn.Module):
    """``step`` with its block's parameters and buffers as trailing arguments, so one trace serves every layer."""

    def __init__(self, step: nn.Module, block: nn.Module, n_inputs: int) -> None:
        super().__init__()
        self.step, self.n_inputs = step, n_inputs
        self.keys = [f"block.{name}" for name, _ in tensors_of(block)]

    def forward(self, *args):
        inputs, weights = args[: self.n_inputs], args[self.n_inputs:]
        return torch.func.functional_call(self.step, dict(zip(self.keys, weights, strict=True)), inputs)


def cache_names(n_layers: int) -> tuple[list[str], list[str]]:
    """The decode graph's cache inputs and outputs, named as ONNX Runtime GenAI names them."""
    past = [f"past_key_values.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]
    return past, present


def decode_pieces(model: PonderLM, opset: int, compaction: bool = False) -> dict[str, Any]:
    """The traced pieces of the decode graph (ONNX graphs): ``prologue``, ``step`` (one layer's full step: the state,
    the tables, ``act_threshold``, ``layer``, ``past_key``, ``past_value``, then the layer's weights ``w0, w1, ...``),
    ``fill`` (one layer's key/value fill: ``hidden``, ``cos``, ``sin``, ``past_key``, ``past_value``, the weights),
    ``running`` and ``epilogue``; ``weight_names`` and ``fill_names`` too. ``benchmarks/bench_generate.py`` times
    ``step`` and ``fill`` on their own for the bound of a decode step's cost."""
    cfg = model.cfg
    window = model.dials["attn_window"].as_int()
    auto = torch.export.Dim.AUTO
    head_dim = cfg.d_model // cfg.n_heads
    b_, t_, p_ = 2, 3, 4  # example sizes (not 0 or 1, which the tracer would fix)
    ids = torch.zeros((b_, t_), dtype=torch.int64)
    mask_in = torch.ones((b_, p_ + t_), dtype=torch.int64)
    with torch.no_grad():
        pro_out = tuple(x.clone() for x in DecodePrologue(model, window)(ids, mask_in))
    prologue = _trace(DecodePrologue(model, window), (ids, mask_in), ["input_ids", "attention_mask"],
                      [*STATE, *TABLES], {"input_ids": {0: auto, 1: auto}, "attention_mask": {0: auto, 1: auto}},
                      opset)
    template = uniform_template(model)
    weights = tuple(t.detach() for _, t in tensors_of(template))
    weight_names = [f"w{k}" for k in range(len(weights))]
    past = torch.zeros((b_, cfg.n_heads, p_, head_dim))
    cache = {0: auto, 2: auto}
    state_shapes = [{0: auto, 1: auto}] * 5 + [None]
    table_shapes = [{0: auto, 2: auto}, {0: auto, 2: auto}, {0: auto, 2: auto, 3: auto}]
    step_names = [*STATE, *TABLES, "act_threshold", "layer", "past_key", "past_value"]
    # distinct tensors for the keys and the values: the tracer merges inputs that are one tensor
    step_args = (*pro_out, torch.full((b_, 1), 0.9), torch.tensor(1, dtype=torch.int64), past, past.clone(), *weights)
    step_shapes = [tuple(state_shapes + table_shapes + [{0: auto}, None, cache, cache] + [None] * len(weights))]
    step_outputs = [f"next_{s}" for s in STATE] + ["key", "value"]
    step = _trace(_Weighted(_CachedStep(model, template, False), template, len(step_names)), step_args,
                  step_names + weight_names, step_outputs, step_shapes, opset)
    compacted = choice = None
    if compaction:
        compacted = _trace(_Weighted(_CachedStep(model, template, True), template, len(step_names)), step_args,
                           step_names + weight_names, step_outputs, step_shapes, opset)
        choice = _trace(Choice(), (pro_out[0], torch.tensor(0.5)), ["halted", "compaction_cutoff"],
                        ["compacted", "dense"], {"halted": {0: auto, 1: auto}, "compaction_cutoff": None}, opset)
    fill_names = ["hidden", "cos", "sin", "past_key", "past_value"]
    fill = _trace(_Weighted(_Fill(template), template, len(fill_names)),
                  (pro_out[4], pro_out[6], pro_out[7], past, past.clone(), *weights), fill_names + weight_names,
                  ["key", "value"], [tuple([state_shapes[0], *table_shapes[:2], cache, cache] + [None] * len(weights))],
                  opset)
    running = _trace(Running(), (pro_out[0],), ["halted"], ["running"], {"halted": {0: auto, 1: auto}}, opset)
    epilogue = _trace(Epilogue(model), (pro_out[3], pro_out[2]), ["output", "depth"], ["logits", "token_depth"],
                      {"output": {0: auto, 1: auto}, "depth": {0: auto, 1: auto}}, opset)

    return {"prologue": prologue, "step": step, "compacted": compacted, "choice": choice, "fill": fill,
            "running": running, "epilogue": epilogue, "weight_names": weight_names, "fill_names": fill_names}


def build_decode(model: PonderLM, opset: int, cutoff: float | None = None, unrolled: bool = False) -> Any:
    """The decode graph of ``model`` (folded already, in eval): one step of ``ponder.decode.decode_step``.

    Inputs ``input_ids [batch, seq]`` (the new tokens), ``attention_mask [batch, total]`` (total = past + seq),
    ``past_key_values.{i}.key|value [batch, heads, past, head_dim]``, ``act_threshold`` (optional), ``row_threshold``
    (optional, ``[batch]``: each row's own; <= 0 takes ``act_threshold``). A new token whose ``attention_mask`` is
    0 starts halted (depth 0). Outputs
    ``logits [batch, seq, vocab]``, ``present.{i}.key|value [batch, heads, total, head_dim]``, ``token_depth``
    and ``layers_executed``. Layer 0 always runs; each later layer is an ``If``: the full step while some new
    token runs, else the key/value fill of the frozen states.

    With a ``cutoff`` (compaction "on" or "auto") a step of several new tokens (a prefill) runs each layer dense
    or compacted, chosen in the graph by the optional input ``compaction_cutoff`` as the scoring graph chooses:
    one top-level ``If`` on ``seq > 1`` picks that layer chain or the plain one, so a step of one new token pays
    for no choice. ``unrolled``: every layer's dense step, no ``If`` (a benchmark's baseline)."""
    from onnx import TensorProto, helper

    cfg = model.cfg
    head_dim = cfg.d_model // cfg.n_heads
    pieces = decode_pieces(model, opset, compaction=cutoff is not None and not unrolled)
    b = _Builder()
    per_row(b, model, lengths=False)  # act_threshold as [batch, 1]: "batch/act_threshold"
    out = b.inline(pieces["prologue"], "prologue", {"input_ids": "input_ids", "attention_mask": "attention_mask"},
                   "prologue")
    past_names, present_names = cache_names(cfg.n_layers)
    results = ["logits", *present_names, "token_depth", "layers_executed"]
    if pieces["compacted"] is None:
        nodes, values = _chain(b, model, pieces, out, "decode", compact=False, unrolled=unrolled)
        b.nodes += nodes + [helper.make_node("Identity", [v], [r]) for v, r in zip(values, results, strict=True)]
    else:
        types = [helper.make_tensor_type_proto(TensorProto.FLOAT, None)] * (1 + len(present_names)) + \
            [helper.make_tensor_type_proto(TensorProto.INT64, None)] * 2
        branches = []
        for tag, compact in (("prefill", True), ("step", False)):
            nodes, values = _chain(b, model, pieces, out, tag, compact=compact, unrolled=False)
            branches.append(helper.make_graph(nodes, tag, [], [_typed(v, t) for v, t in zip(values, types,
                                                                                              strict=True)]))
        one, index = b.constant("decode/one", np.array(1, np.int64)), b.constant("decode/seq-axis", np.array(1))
        b.nodes += [helper.make_node("Shape", ["input_ids"], ["decode/shape"]),
                    helper.make_node("Gather", ["decode/shape", index], ["decode/seq"]),
                    helper.make_node("Greater", ["decode/seq", one], ["decode/several"]),
                    helper.make_node("If", ["decode/several"], results, name="decode/if-several",
                                     then_branch=branches[0], else_branch=branches[1])]
    cache_in = ["batch", cfg.n_heads, "past", head_dim]
    cache_out = ["batch", cfg.n_heads, "total", head_dim]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
              *(helper.make_tensor_value_info(name, TensorProto.FLOAT, cache_in) for name in past_names),
              helper.make_tensor_value_info("act_threshold", TensorProto.FLOAT, [])]
    if pieces["compacted"] is not None:
        inputs.append(helper.make_tensor_value_info("compaction_cutoff", TensorProto.FLOAT, []))
        b.constant("compaction_cutoff", np.array(cutoff, dtype=np.float32))
    inputs += batching_inputs(lengths=False)
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", cfg.vocab_size]),
               *(helper.make_tensor_value_info(name, TensorProto.FLOAT, cache_out) for name in present_names),
               helper.make_tensor_value_info("token_depth", TensorProto.INT64, ["batch", "seq"]),
               helper.make_tensor_value_info("layers_executed", TensorProto.INT64, [])]
    graph = helper.make_graph(b.nodes, "ponder-decode", inputs, outputs, list(b.initializers.values()))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="ponder")
    proto.ir_version = 10
    drop_unused(proto)  # e.g. a weight whose transposed copy the steps read instead
    return proto


def _chain(b: _Builder, model: PonderLM, pieces: dict[str, Any], prologue: list[str], tag: str, *, compact: bool,
           unrolled: bool) -> tuple[list[Any], list[str]]:
    """The layer chain and the epilogue as nodes (not yet in ``b``; the weights are), named under ``tag``;
    returns them and the names of logits, each layer's keys and values, token depths and layers executed."""
    from onnx import helper

    step, fill, running = pieces["step"], pieces["fill"], pieces["running"]
    weight_names, fill_names = pieces["weight_names"], pieces["fill_names"]
    past_names, _ = cache_names(model.cfg.n_layers)
    saved, b.nodes = b.nodes, []
    state, tables = prologue[:6], dict(zip(TABLES, prologue[6:], strict=True))
    types = [o.type for o in step.output]
    presents: list[str] = []
    for i, block in enumerate(model.blocks):
        at = f"{tag}/layer{i}"
        bound = {name: b.constant(f"layer{i}/{n}", t.detach().numpy()) for name, (n, t) in
                 zip(weight_names, tensors_of(block), strict=True)}
        bound.update(dict(zip(STATE, state, strict=True)), **tables, act_threshold="batch/act_threshold",
                     layer=b.constant(f"layer{i}/index", np.array(i, dtype=np.int64)),
                     past_key=past_names[2 * i], past_value=past_names[2 * i + 1])
        if i == 0 or unrolled:  # the first layer always runs its full step (unrolled: every layer, no If)
            new = b.inline(step, "step", bound, at)
        else:
            fill_nodes, kv = b.copy(fill, "fill", {k: bound[k] for k in [*fill_names, *weight_names]}, f"{at}/fill")
            kept = [f"{at}/fill/keep/{s}" for s in STATE]
            fill_nodes += [helper.make_node("Identity", [name], [k]) for name, k in zip(state, kept, strict=True)]
            fill_graph = helper.make_graph(fill_nodes, f"{at}/fill", [],
                                           [_typed(n, t) for n, t in zip([*kept, *kv], types, strict=True)])
            full = b.branch(step, "step", bound, f"{at}/step", types)
            new = [f"{at}/out/{s}" for s in [*STATE, "key", "value"]]
            if not compact:
                (running_now,) = b.inline(running, "running", {"halted": state[0]}, f"{at}/running")
                b.nodes.append(helper.make_node("If", [running_now], new, name=f"{at}/if-running",
                                                then_branch=full, else_branch=fill_graph))
            else:  # If(dense, full step, If(compacted, compacted step, fill)): one If deep at full depth
                compacted, dense = b.inline(pieces["choice"], "choice", {"halted": state[0], "compaction_cutoff":
                                                                         "compaction_cutoff"}, f"{at}/choice")
                inner = [f"{at}/else/{s}" for s in [*STATE, "key", "value"]]
                compact_step = b.branch(pieces["compacted"], "compacted", bound, f"{at}/compacted", types)
                otherwise = helper.make_graph(
                    [helper.make_node("If", [compacted], inner, name=f"{at}/if-compacted",
                                      then_branch=compact_step, else_branch=fill_graph)],
                    f"{at}/else", [], [_typed(n, t) for n, t in zip(inner, types, strict=True)])
                b.nodes.append(helper.make_node("If", [dense], new, name=f"{at}/if-dense",
                                                then_branch=full, else_branch=otherwise))
        state = new[:6]
        presents += new[6:8]
    logits, depth = b.inline(pieces["epilogue"], "epilogue", {"output": state[3], "depth": state[2]},
                             f"{tag}/epilogue")
    nodes, b.nodes = b.nodes, saved
    return nodes, [logits, *presents, depth, state[5]]
