"""Low-precision exports: int8 and bf16 weights in both graphs (inside the early-exit branches too), the quality bound
that lets one ship or refuses it, and the precision shown wherever a model is described.

The graphs are copies of the serving tests' real float32 export (``model_repository``): lowering is what
``ponder export --precision`` does after its float32 check, so no test here traces a model again."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch
from conftest import served_model
from onnx import numpy_helper

from ponder import precision
from ponder.cli import main
from ponder.export import ExportError, session
from ponder.generation import SamplingParams
from ponder.model_repository import decode_path
from ponder.precision import QualityBoundError, lower_checked
from ponder.serve.engine import Engine, read_metadata


@pytest.fixture
def fp32_copy(model_repository, tmp_path):
    """tiny/1's model.onnx and decode.onnx (float32), copied where a test may rewrite them."""
    folder = tmp_path / "1"
    shutil.copytree(model_repository / "tiny" / "1", folder)
    return folder / "model.onnx"


def samples(rows: int = 4, t: int = 24) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, 256, (rows, t), generator=gen) for _ in range(2)]


def _depth_of(graph, depth=0):
    for node in graph.node:
        yield node, depth
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _depth_of(attr.g, depth + 1)


def test_quantize_int8_is_per_output_channel_and_within_half_a_step():
    weight = np.random.default_rng(0).normal(size=(32, 6)).astype(np.float32)
    weight[:, 2] *= 100  # a loud channel keeps its own scale: the quiet ones lose nothing to it
    q, scale = precision.quantize_int8(weight)
    assert q.dtype == np.int8 and scale.shape == (6,)
    assert np.all(np.abs(q.astype(np.float32) * scale - weight) <= scale / 2 + 1e-6)
    assert scale[2] > 50 * np.delete(scale, 2).max()


def test_int8_rewrites_every_weight_matmul_in_both_graphs_inside_the_branches(fp32_copy):
    for path in (fp32_copy, decode_path(fp32_copy)):
        before = onnx.load(str(path))
        matrices = {i.name: list(i.dims) for i in before.graph.initializer if len(i.dims) == 2}
        multiplied = {n.input[1] for n in precision._nodes(before.graph) if n.op_type == "MatMul"}
        weights = {name for name in multiplied & set(matrices) if min(matrices[name]) > 1}
        halting = {name for name in multiplied & set(matrices) if matrices[name][1] == 1}  # [d, 1] per layer
        summary = precision.lower_file(path, "int8")
        after = onnx.load(str(path))
        nodes = list(_depth_of(after.graph))
        quantized = [(n, d) for n, d in nodes if n.op_type == "DynamicQuantizeMatMul"]
        assert summary["matmuls"] == len(quantized) >= len(weights) > 0
        assert any(d >= 1 for _, d in quantized), "the layers inside If branches were not lowered"
        assert not [n for n, _ in nodes if n.op_type == "MatMul" and n.input[1] in weights]
        assert halting and {n.input[1] for n, _ in nodes if n.op_type == "MatMul"} >= halting  # kept float32
        inits = {i.name: i for i in after.graph.initializer}
        assert not set(weights) & set(inits)  # the float32 weights are gone from the file
        for node, _ in quantized:
            assert inits[node.input[1]].data_type == onnx.TensorProto.INT8
            assert numpy_helper.to_array(inits[node.input[2]]).shape == (inits[node.input[1]].dims[1],)
        assert summary["weight_bytes"] < summary["weight_bytes_fp32"] / 3


def test_int8_runs_close_to_fp32_and_the_bound_measures_it(fp32_copy, tmp_path):
    low = tmp_path / "low.onnx"
    shutil.copyfile(fp32_copy, low)
    precision.lower_file(low, "int8")
    ids = samples()[0].numpy()
    feed = {"input_ids": ids, "act_threshold": np.array(1.0, np.float32)}
    ref, got = session(fp32_copy).run(None, feed), session(low).run(None, feed)
    assert got[0].shape == ref[0].shape and int(got[1]) == int(ref[1]) == 3
    assert 0 < np.abs(got[0] - ref[0]).max() < 0.1 * np.abs(ref[0]).max()  # lowered, and still the same model
    [row] = precision.quality(session(fp32_copy), session(low), [ids], (1.0,))
    assert 0.98 < row["perplexity_ratio"] < 1.02 and row["tokens"] == ids.size
    same = float((got[0].argmax(-1) == ref[0].argmax(-1)).mean())
    assert row["argmax_agreement"] == pytest.approx(same)


def test_bf16_within_the_bound_is_written_with_its_precision_and_quality(fp32_copy, capsys):
    rows = lower_checked(served_model(), fp32_copy, decode_path(fp32_copy), "bf16", samples())
    assert {r["graph"] for r in rows} == {"scoring", "decode"} and all(r["within_bound"] for r in rows)
    assert {r["threshold"] for r in rows} == {0.9, 1.0}  # the trained threshold and full depth
    for path in (fp32_copy, decode_path(fp32_copy)):
        meta = read_metadata(path)
        assert meta["precision"] == "bf16" and meta["quality"] and all(q["within_bound"] for q in meta["quality"])
        proto = onnx.load(str(path))
        assert any(i.data_type == onnx.TensorProto.BFLOAT16 for i in proto.graph.initializer)
    engine = Engine(fp32_copy)  # the server's engine opens it and generates through the bf16 decode graph
    assert engine.metadata["precision"] == "bf16"
    assert engine.infer(samples()[0][:1].numpy(), 1.0).layers_executed == 3
    assert main(["inspect", str(fp32_copy)]) == 0
    assert "precision: bf16" in capsys.readouterr().out


def test_a_lowering_outside_the_bound_is_refused_and_says_by_how_much(fp32_copy):
    """The served model's random weights leave near-ties between top logits; int8 flips some of them (more than
    1%), which the bound catches. Nothing is marked as int8."""
    with pytest.raises(QualityBoundError) as caught:  # export_model raises it as an ExportError
        lower_checked(served_model(), fp32_copy, decode_path(fp32_copy), "int8", samples())
    message = str(caught.value)
    assert "outside the quality bound" in message and "argmax" in message and "nothing was written" in message
    assert "fp32" in message  # what to do instead
    assert read_metadata(fp32_copy)["precision"] == "fp32"


def test_ponder_export_int8_end_to_end(tmp_path, capsys):
    """The CLI on a trained checkpoint: both graphs lowered, the bound measured on its validation text and printed,
    the precision in the metadata and in ``ponder inspect``, and the int8 decode graph generating."""
    from helpers import write_tiny_config

    from ponder.config import load_config
    from ponder.train import Trainer

    Trainer(load_config(write_tiny_config(tmp_path, steps=8)), tmp_path / "run", progress=False).train()
    out = tmp_path / "int8" / "model.onnx"
    assert main(["export", str(tmp_path / "run"), "-o", str(out), "--precision", "int8", "--skip-check",
                 "--compaction", "off"]) == 0  # one traced step fewer: the lowering is the same
    printed = capsys.readouterr().out
    for graph in ("scoring", "decode"):
        assert f"int8 {graph} graph at threshold 1: perplexity" in printed
    assert "int8" in printed.splitlines()[-1]
    for path in (out, decode_path(out)):
        meta = read_metadata(path)
        assert meta["precision"] == "int8" and meta["lowered"]["matmuls"] > 0
        assert all(q["within_bound"] and q["tokens"] >= 256 for q in meta["quality"])  # validation text, 2 batches
    assert main(["inspect", str(out)]) == 0
    assert "precision: int8" in capsys.readouterr().out
    engine = Engine(out)
    steps = engine.generate("the ", SamplingParams(max_tokens=4), 1.0)["steps"]
    assert len(steps) == 4 and all(s["token_depth"] == engine.n_layers for s in steps)


def test_precision_is_checked_before_anything_slow(tmp_path, capsys):
    from ponder.export import export_model

    with pytest.raises(ExportError, match="precision must be one of fp32, bf16, int8, got 'fp16'"):
        export_model(served_model(), tmp_path / "m.onnx", precision="fp16")
    assert not list(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        main(["export", "nowhere", "-o", str(tmp_path / "m.onnx"), "--precision", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err
