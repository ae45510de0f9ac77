"""The exported early-exit graph, assembled from a few small traced pieces.

Tracing a whole model with one ``torch.cond`` per layer costs the exporter seconds per layer and
per branch, so a 6-layer model took a minute and twice that once each layer had a compacted
branch. Every layer has the same structure, though, only other weights. So the pieces are traced
once each, with the layer's weights as *inputs*:

- the prologue: ``input_ids`` and ``row_lengths`` -> the initial halting state (padding halted), the RoPE
  tables and the attention mask;
- the layer step, dense and (with compaction) compacted: the carried state and one layer's weights
  -> the state after that layer;
- the choice: which step a layer runs, from the tokens still running (and ``compaction_cutoff``);
- the epilogue: the output state -> logits and token depths.

The ONNX graph is then put together here: layer 0 runs the dense step inline (nothing has halted
before it); each later layer is an ``If`` on "run dense" whose branch is a renamed copy of the
traced step bound to that layer's weights (outer-scope initializers), and whose other branch is
an ``If`` on "run compacted" (else: pass the state through). Export time no longer grows with
depth.

Batching (``per_row``): the optional ``row_threshold`` ``[batch]`` gives each row its own threshold (a value <= 0
takes the scalar ``act_threshold``), which reaches every step as ``[batch, 1]``; the optional ``row_lengths``
``[batch]`` marks right padding, which starts halted with depth 0 (``ponder.model.halt_padding``), so a padded
batch gives each row its own answer.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ponder.contracts.halting import HaltState
from ponder.model import (
    PonderLM,
    Rows,
    additive_mask,
    attention_mask,
    compacted_step,
    halt_padding,
    padding,
    rope_tables,
)
from ponder.precision import drop_unused

STATE = ("halted", "cum", "depth", "output", "hidden", "layers")
TABLES = ("cos", "sin", "mask")
# what the builder computes once when every input is an initializer (a weight and the traced constants)
FOLDABLE = ("Transpose", "Slice", "Gather", "Squeeze", "Unsqueeze", "Reshape", "Cast")


class Prologue(nn.Module):
    def __init__(self, model: PonderLM, window: int) -> None:
        super().__init__()
        self.model, self.window = model, window

    def forward(self, input_ids: Tensor, row_lengths: Tensor) -> tuple[Tensor, ...]:
        m = self.model
        t = input_ids.shape[1]
        cos, sin = rope_tables(t, m.cfg.d_model // m.cfg.n_heads, m.dials.value("rope_base"), input_ids.device)
        mask = additive_mask(attention_mask(t, m.cfg.n_heads, m.cfg.n_local_heads, self.window, input_ids.device))
        st = halt_padding(m.halting.init_state(m.embed(input_ids)), padding(row_lengths, t))
        return st.halted, st.cum, st.depth, st.output, st.hidden, torch.zeros((), dtype=torch.int64), cos, sin, mask


class _LayerStep(nn.Module):
    def __init__(self, model: PonderLM, block: nn.Module, window: int, compact: bool) -> None:
        super().__init__()
        self.block, self.halting = block, model.halting
        self.cfg, self.window, self.compact = model.cfg, window, compact

    def forward(self, halted, cum, depth, output, hidden, layers, cos, sin, mask, act_threshold, layer):
        state = HaltState(halted, cum, depth, output, hidden, cum, cum)
        if self.compact:
            n = (~halted).sum(1).max().item()  # the most running tokens in a row: rows per batch row
            torch._check(n >= 1)
            torch._check(n <= halted.shape[1])
            a = (~halted).any(1).sum().item()  # batch rows with a running token: only they need keys and values
            torch._check(a >= 1)
            torch._check(a <= halted.shape[0])
            rows = Rows.running(halted, n, mask, rows=a)
            new, _ = compacted_step(self.block, self.halting, state, layer, act_threshold, cos, sin, rows)
        else:
            new = self.halting.step(state, self.block(hidden, cos, sin, mask), layer, act_threshold)
        return new.halted, new.cum, new.depth, new.output, new.hidden, layers + 1


class TracedLayer(nn.Module):
    """One layer and halting step, dense or compacted; the block's parameters and buffers come in as
    arguments after the state (``keys`` order), so one trace serves every layer."""

    def __init__(self, model: PonderLM, block: nn.Module, window: int, compact: bool) -> None:
        super().__init__()
        self.step = _LayerStep(model, block, window, compact)
        self.keys = [f"block.{name}" for name, _ in tensors_of(block)]

    def forward(self, *args):
        state, weights = args[:11], args[11:]
        return torch.func.functional_call(self.step, dict(zip(self.keys, weights, strict=True)), state)


def uniform_template(model: PonderLM) -> nn.Module:
    """Layer 0, whose traced step serves every layer; a ValueError if a layer has other parameters."""
    template = model.blocks[0]
    signature = [(n, tuple(p.shape)) for n, p in tensors_of(template)]
    for i, block in enumerate(model.blocks):
        if [(n, tuple(p.shape)) for n, p in tensors_of(block)] != signature:
            raise ValueError(f"layer {i} has other parameters than layer 0: its norm plugin builds different "
                             "modules per layer")
    return template


def tensors_of(block: nn.Module) -> list[tuple[str, Tensor]]:
    """A block's parameters and buffers, in the order the traced step takes them."""
    return [*block.named_parameters(), *block.named_buffers()]


class Choice(nn.Module):
    """Which step the next layer runs: ``(compacted, dense)``, neither once every token has halted."""

    def forward(self, halted: Tensor, compaction_cutoff: Tensor) -> tuple[Tensor, Tensor]:
        running = ~halted
        share = running.sum(1).max().to(torch.float32) / running.shape[1]
        compacted = share <= compaction_cutoff
        anyone = running.any()
        return anyone & compacted, anyone & ~compacted


class Running(nn.Module):
    def forward(self, halted: Tensor) -> Tensor:
        return ~halted.all()


class Epilogue(nn.Module):
    def __init__(self, model: PonderLM) -> None:
        super().__init__()
        self.norm_final, self.head = model.norm_final, model.head

    def forward(self, output: Tensor, depth: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.norm_final(output)), depth.to(torch.int64)


def _trace(module: nn.Module, args: tuple, names: list[str], outputs: list[str], shapes: dict, opset: int):
    logging.disable(logging.WARNING)  # the exporter's progress chatter; real failures still raise
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, input_names=names, output_names=outputs,
                                        opset_version=opset, dynamic_shapes=shapes, dynamo=True)
    finally:
        logging.disable(logging.NOTSET)
    return program.model_proto.graph


class _Builder:
    """Collects nodes and initializers of the assembled graph; copies traced graphs in under new names."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: dict[str, Any] = {}
        self.hoisted: dict[int, dict[str, str]] = {}  # traced graph -> its initializers' names here
        self.folded: dict[tuple, list[str]] = {}  # (op, input names, attributes) -> the folded outputs' names

    def constant(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers[name] = numpy_helper.from_array(value, name)
        return name

    def copy(self, graph: Any, key: str, inputs: dict[str, str], prefix: str) -> tuple[list[Any], list[str]]:
        """``graph``'s nodes with its inputs bound to ``inputs`` (outer names) and everything else renamed
        under ``prefix``; its initializers go to the outer graph once per traced graph. Returns the nodes
        and the names of the graph's outputs."""
        import onnx

        if id(graph) not in self.hoisted:
            self.hoisted[id(graph)] = {}
            for init in graph.initializer:
                name = f"{key}/{init.name}"
                copied = onnx.TensorProto()
                copied.CopyFrom(init)
                copied.name = name
                self.initializers[name] = copied
                self.hoisted[id(graph)][init.name] = name
        names = {**self.hoisted[id(graph)], **inputs, "": ""}
        nodes = []
        for node in graph.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                raise ValueError(f"a traced piece has control flow ({node.op_type}); it cannot be copied")
            if node.op_type in FOLDABLE and all(names[i] in self.initializers for i in node.input if i):
                # a weight sliced or transposed by every run (how F.linear traces with its weight an input), or the
                # halting unit's row picked by the layer's constant index: computed once, here
                for out, name in zip(node.output, self._folded(node, [names[i] for i in node.input]), strict=True):
                    names[out] = name
                continue
            copied = onnx.NodeProto()
            copied.CopyFrom(node)
            for i, name in enumerate(node.input):
                copied.input[i] = names[name]
            for i, name in enumerate(node.output):
                names[name] = copied.output[i] = f"{prefix}/{name}" if name else ""
            copied.name = f"{prefix}/{node.name or node.op_type}"
            nodes.append(copied)
        return nodes, [names[o.name] for o in graph.output]

    def _folded(self, node: Any, inputs: list[str]) -> list[str]:
        """The outputs of ``node`` (whose inputs are all initializers, ``inputs`` their names here) as new
        initializers, computed once per node and inputs; their names."""
        import onnx
        from onnx import helper, numpy_helper
        from onnx.reference import ReferenceEvaluator

        key = (node.op_type, tuple(inputs), tuple(a.SerializeToString() for a in node.attribute))
        if key not in self.folded:
            single = onnx.NodeProto()
            single.CopyFrom(node)
            del single.input[:]
            single.input.extend(f"in{k}" if name else "" for k, name in enumerate(inputs))
            del single.output[:]
            single.output.extend(f"out{k}" for k in range(len(node.output)))
            feeds = {f"in{k}": numpy_helper.to_array(self.initializers[name]) for k, name in enumerate(inputs) if name}
            graph = helper.make_graph([single], "fold", [], [helper.make_empty_tensor_value_info(o)
                                                             for o in single.output])
            opsets = [helper.make_opsetid("", onnx.defs.onnx_opset_version())]  # these ops mean the same since 13
            values = ReferenceEvaluator(helper.make_model(graph, opset_imports=opsets)).run(None, feeds)
            stem = f"{inputs[0]}/{node.op_type}{len(self.folded)}"
            self.folded[key] = [self.constant(f"{stem}/{k}", np.ascontiguousarray(v)) for k, v in enumerate(values)]
        return self.folded[key]

    def inline(self, graph: Any, key: str, inputs: dict[str, str], prefix: str) -> list[str]:
        nodes, outputs = self.copy(graph, key, inputs, prefix)
        self.nodes.extend(nodes)
        return outputs

    def branch(self, graph: Any, key: str, inputs: dict[str, str], prefix: str, types: list[Any]) -> Any:
        """An ``If`` branch: the copied graph (outer-scope inputs) whose outputs carry ``types``."""
        from onnx import helper

        nodes, outputs = self.copy(graph, key, inputs, prefix)
        return helper.make_graph(nodes, prefix, [], [_typed(name, t) for name, t in zip(outputs, types, strict=True)])

    def passthrough(self, state: list[str], prefix: str, types: list[Any]) -> Any:
        from onnx import helper

        nodes = [helper.make_node("Identity", [name], [f"{prefix}/{i}"]) for i, name in enumerate(state)]
        return helper.make_graph(nodes, prefix, [], [_typed(f"{prefix}/{i}", t) for i, t in enumerate(types)])


def per_row(b: _Builder, model: PonderLM, lengths: bool) -> dict[str, str]:
    """Nodes (into ``b``) for the batching inputs: the threshold of each row, ``[batch, 1]``, from the optional
    ``row_threshold`` ``[batch]`` (a value <= 0, as its default ``[0]``, takes ``act_threshold``) and, with
    ``lengths``, the optional ``row_lengths`` ``[batch]`` (default: every row full length) as ``[batch]``. The
    defaults are initializers. Returns the names the traced pieces take instead of the inputs."""
    from onnx import helper

    b.constant("act_threshold", np.array(model.dials.value("act_threshold"), dtype=np.float32))
    b.constant("row_threshold", np.zeros(1, dtype=np.float32))  # every row: act_threshold
    b.nodes += [helper.make_node("Shape", ["input_ids"], ["batch/size"], end=1),
                helper.make_node("Greater", ["row_threshold", b.constant("batch/zero", np.array(0, np.float32))],
                                 ["batch/row-set"]),
                helper.make_node("Where", ["batch/row-set", "row_threshold", "act_threshold"], ["batch/threshold"]),
                helper.make_node("Expand", ["batch/threshold", "batch/size"], ["batch/thresholds"]),
                helper.make_node("Unsqueeze", ["batch/thresholds", b.constant("batch/axis", np.array([1], np.int64))],
                                 ["batch/act_threshold"])]
    names = {"act_threshold": "batch/act_threshold"}
    if lengths:
        b.constant("row_lengths", np.array([model.cfg.max_seq_len], dtype=np.int64))  # every row full length
        b.nodes.append(helper.make_node("Expand", ["row_lengths", "batch/size"], ["batch/row_lengths"]))
        names["row_lengths"] = "batch/row_lengths"
    return names


def batching_inputs(lengths: bool) -> list[Any]:
    """The graph inputs :func:`per_row` reads besides ``act_threshold``, declared after every older input."""
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info("row_threshold", TensorProto.FLOAT, ["batch"])]
    if lengths:
        inputs.append(helper.make_tensor_value_info("row_lengths", TensorProto.INT64, ["batch"]))
    return inputs


def _typed(name: str, type_proto: Any) -> Any:
    import onnx

    info = onnx.ValueInfoProto()
    info.name = name
    info.type.tensor_type.elem_type = type_proto.tensor_type.elem_type  # shapes left to inference
    return info


def build(model: PonderLM, compaction: str, cutoff: float | None, opset: int, unrolled: bool = False) -> Any:
    """The early-exit ONNX model of ``model`` (folded already, in eval), compacted when ``compaction``
    is "on" or "auto" (``cutoff`` the default of the ``compaction_cutoff`` input). ``unrolled``: every
    layer runs, densely, with no ``If`` (the fixed-depth baseline of the benchmark)."""
    from onnx import TensorProto, helper

    cfg = model.cfg
    window = model.dials["attn_window"].as_int()
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=2, max=max(2, cfg.max_seq_len))
    ids = torch.zeros((2, min(16, cfg.max_seq_len)), dtype=torch.int64)
    lengths = torch.full((2,), ids.shape[1], dtype=torch.int64)
    with torch.no_grad():  # example values; cloned, as the initial state shares one zeros tensor between fields
        prologue_out = tuple(t.clone() for t in Prologue(model, window)(ids, lengths))
    prologue = _trace(Prologue(model, window), (ids, lengths), ["input_ids", "row_lengths"], [*STATE, *TABLES],
                      {"input_ids": {0: batch, 1: seq}, "row_lengths": {0: batch}}, opset)

    template = uniform_template(model)
    signature = [(n, tuple(p.shape)) for n, p in tensors_of(template)]
    state_shapes = [{0: batch, 1: seq}] * 5 + [None]
    table_shapes = [{0: seq}, {0: seq}, {1: seq, 2: seq}]
    step_names = [*STATE, *TABLES, "act_threshold", "layer"]
    weight_names = [f"w{k}" for k in range(len(signature))]
    steps = {}
    for compact in ([False, True] if compaction != "off" else [False]):
        step = TracedLayer(model, template, window, compact)
        weights = tuple(t.detach() for _, t in tensors_of(template))
        args = (*prologue_out, torch.full((2, 1), 0.9), torch.tensor(1, dtype=torch.int64), *weights)
        # the one *args; the threshold comes per row, [batch, 1]
        shapes = [tuple(state_shapes + table_shapes + [{0: batch}, None] + [None] * len(weights))]
        steps[compact] = _trace(step, args, step_names + weight_names, [f"next_{s}" for s in STATE], shapes, opset)
    if unrolled:
        choice = None
    elif compaction != "off":
        choice = _trace(Choice(), (prologue_out[0], torch.tensor(0.5)), ["halted", "compaction_cutoff"],
                        ["compacted", "dense"], {"halted": {0: batch, 1: seq}, "compaction_cutoff": None}, opset)
    else:
        choice = _trace(Running(), (prologue_out[0],), ["halted"], ["running"], {"halted": {0: batch, 1: seq}},
                        opset)
    epilogue = _trace(Epilogue(model), (prologue_out[3], prologue_out[2]), ["output", "depth"],
                      ["logits", "token_depth"], {"output": {0: batch, 1: seq}, "depth": {0: batch, 1: seq}}, opset)

    b = _Builder()
    rows = per_row(b, model, lengths=True)
    out = b.inline(prologue, "prologue", {"input_ids": "input_ids", "row_lengths": rows["row_lengths"]}, "prologue")
    state, tables = out[:6], dict(zip(TABLES, out[6:], strict=True))
    types = [o.type for o in steps[False].output]
    for i, block in enumerate(model.blocks):
        bound = {name: b.constant(f"layer{i}/{n}", t.detach().numpy()) for name, (n, t) in
                 zip(weight_names, tensors_of(block), strict=True)}
        bound.update(dict(zip(STATE, state, strict=True)), **tables, act_threshold=rows["act_threshold"],
                     layer=b.constant(f"layer{i}/index", np.array(i, dtype=np.int64)))
        if i == 0 or unrolled:  # nothing has halted before the first layer: it always runs, densely
            state = b.inline(steps[False], "dense", bound, f"layer{i}")
            continue
        bound.update(dict(zip(STATE, state, strict=True)))
        dense_step = b.branch(steps[False], "dense", bound, f"layer{i}/dense", types)
        skip = b.passthrough(state, f"layer{i}/skip", types)
        new = [f"layer{i}/out/{s}" for s in STATE]
        if compaction == "off":
            running = b.inline(choice, "choice", {"halted": state[0]}, f"layer{i}/choice")
            b.nodes.append(helper.make_node("If", [running[0]], new, name=f"layer{i}/if-running",
                                            then_branch=dense_step, else_branch=skip))
        else:  # If(dense, dense step, If(compacted, compacted step, pass through)): the dense path, taken at
            # full depth, is one If deep as without compaction
            compacted, dense = b.inline(choice, "choice", {"halted": state[0], "compaction_cutoff":
                                                           "compaction_cutoff"}, f"layer{i}/choice")
            compact_step = b.branch(steps[True], "compacted", bound, f"layer{i}/compacted", types)
            inner = [f"layer{i}/else/{s}" for s in STATE]
            otherwise = helper.make_graph(
                [helper.make_node("If", [compacted], inner, name=f"layer{i}/if-compacted",
                                  then_branch=compact_step, else_branch=skip)],
                f"layer{i}/else", [], [_typed(name, t) for name, t in zip(inner, types, strict=True)])
            b.nodes.append(helper.make_node("If", [dense], new, name=f"layer{i}/if-dense",
                                            then_branch=dense_step, else_branch=otherwise))
        state = new
    logits, depth = b.inline(epilogue, "epilogue", {"output": state[3], "depth": state[2]}, "epilogue")
    b.nodes += [helper.make_node("Identity", [logits], ["logits"]),
                helper.make_node("Identity", [state[5]], ["layers_executed"]),
                helper.make_node("Identity", [depth], ["token_depth"])]

    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("act_threshold", TensorProto.FLOAT, [])]
    if compaction != "off":
        inputs.append(helper.make_tensor_value_info("compaction_cutoff", TensorProto.FLOAT, []))
        b.constant("compaction_cutoff", np.array(cutoff, dtype=np.float32))
    inputs += batching_inputs(lengths=True)
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", cfg.vocab_size]),
               helper.make_tensor_value_info("layers_executed", TensorProto.INT64, []),
               helper.make_tensor_value_info("token_depth", TensorProto.INT64, ["batch", "seq"])]
    graph = helper.make_graph(b.nodes, "ponder", inputs, outputs, list(b.initializers.values()))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="ponder")
    proto.ir_version = 10  # what ONNX Runtime 1.2x reads; the exporter writes the same
    drop_unused(proto)  # e.g. a weight whose transposed copy the steps read instead
    return proto
