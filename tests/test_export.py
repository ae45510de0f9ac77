"""ONNX export: early exit inside the graph, parity with PyTorch, folding, metadata, and the CLI."""

from __future__ import annotations

import json
import os
import types

import numpy as np
import onnx
import pytest
import torch
from helpers import run_ponder, write_tiny_config
from torch import nn

from ponder import export, registry
from ponder.config import ModelConfig, PluginSpec, load_config
from ponder.export import ExportError, export_model, fold_norms
from ponder.model import DEFAULT_COMPACTION_CUTOFF, PonderLM
from ponder.registry import Registry, hookimpl
from ponder.serve.engine import Engine, read_metadata
from ponder.train import Trainer

BUILTINS = Registry(autoload=False)
NORMS = [i.name for i in BUILTINS.list_plugins("norm")]
HALTING = [i.name for i in BUILTINS.list_plugins("halting")]


def tiny(norm: str, halting: str, seed: int = 0) -> PonderLM:
    """A small model with its parameters spread out, so tokens halt at different depths and folding matters."""
    torch.manual_seed(seed)
    params = {} if halting == "fixed" else {"bias_init": 2.0}  # most tokens halt after layer 1 at low thresholds
    # DyT and ADyT at alpha 0.5 rather than their width-32 default (8.84): inputs spread over tanh's S, not its tails
    norm_params = {"alpha_init_value": 0.5} if norm in ("dyt", "adyt") else {}
    model = PonderLM(ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=2, n_local_heads=1, d_ff=64,
                                 max_seq_len=32, attn_window=6.0, act_threshold=0.9),
                     norm=PluginSpec(norm, norm_params), halting=PluginSpec(halting, params))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
        if halting != "fixed":  # halting units that tell tokens apart: they halt at different depths per row
            model.halting.weight.normal_(0.0, 5.0)
        if model.embed.scale is not None:  # DyT's embedding scale, at a trained-looking value export must fold in
            model.embed.scale.fill_(1.3)
    return model.eval()


def samples():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 40, shape, generator=gen) for shape in ((2, 24), (1, 13), (5, 7))]


# Every norm and every halting plugin, each in at least one export. The norm is built into the blocks and the
# halting rule into the exit test, apart from each other, so pairs that cover both lists check what the full
# product would, at a third of the tracing time (an export traces for ~10 s of CPU).
PAIRS = [(norm, HALTING[i % len(HALTING)]) for i, norm in enumerate(NORMS)]
PAIRS += [(NORMS[i % len(NORMS)], halting) for i, halting in enumerate(HALTING) if i >= len(NORMS)]


@pytest.mark.parametrize(("norm", "halting"), PAIRS)
def test_parity_for_every_norm_and_halting_plugin(tmp_path, norm, halting):
    """One compacting export checks all three ways a layer can run, through ``compaction_cutoff``:
    0.0 (always dense, as "off"), 1.0 (always compacted, as "on") and the default (auto)."""
    model = tiny(norm, halting)
    report = export_model(model, tmp_path / "m.onnx", samples=samples(), compaction="auto")
    scoring = [c for c in report.checks if c.get("graph") != "decode"]
    decoding = [c for c in report.checks if c.get("graph") == "decode"]
    assert len(scoring) == 3 * 3 * 4  # three shapes (dynamic batch and length) x three cutoffs x four thresholds
    assert {c["compaction_cutoff"] for c in scoring} == {0.0, 1.0, DEFAULT_COMPACTION_CUTOFF}
    # the decode graph: per shape a prefill of half and three steps through the cache, at four thresholds and the
    # three cutoffs (dense, compacted wherever a token halted, the default)
    assert len(decoding) == 3 * 4 * 4 * 3 and {c["past"] > 0 for c in decoding} == {True, False}
    assert {c["compaction_cutoff"] for c in decoding} == {0.0, 1.0, DEFAULT_COMPACTION_CUTOFF}
    assert all(c["max_logit_diff"] <= 1e-4 and c["depth_equal"] for c in report.checks)
    assert all(c["layers_executed"] == c["torch_layers_executed"] for c in report.checks)
    full = [c for c in report.checks if c["threshold"] == 1.0]
    assert all(c["layers_executed"] == 2 for c in full)
    if halting != "fixed":  # the graph really exits early somewhere, and so does a step through the cache
        assert min(c["layers_executed"] for c in scoring) < 2
        assert min(c["layers_executed"] for c in decoding if c["past"] > 0) < 2
    onnx.checker.check_model(str(tmp_path / "m.onnx"), full_check=True)


def _ran(sess_path, feed) -> set[str]:
    """The kinds of layer step ONNX Runtime ran for ``feed``, from its profile ({"dense", "compacted"})."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(sess_path.parent / "profile")
    sess = ort.InferenceSession(str(sess_path), options, providers=["CPUExecutionProvider"])
    sess.run(None, feed)
    events = json.loads(open(sess.end_profiling()).read())
    names = {e["name"] for e in events if e.get("cat") == "Node"}
    return {kind for kind in ("dense", "compacted") if any(f"layer1/{kind}/" in n for n in names)}


@pytest.mark.parametrize("mode", ["on", "auto", "off"])
def test_each_compaction_mode_runs_the_step_it_says(tmp_path, mode):
    model = tiny("layernorm", "act")
    export_model(model, tmp_path / "m.onnx", samples=samples()[:1], compaction=mode)
    meta = read_metadata(tmp_path / "m.onnx")
    inputs = [name for name, _ in meta["inputs"]]
    ids = samples()[0].numpy()
    partly = {"input_ids": ids, "act_threshold": np.array(0.9, np.float32)}  # some tokens halt after layer 0
    if mode == "off":
        assert inputs == ["input_ids", "act_threshold"] and meta["compaction"] == "off"
        assert _ran(tmp_path / "m.onnx", partly) == {"dense"}
        return
    assert inputs == ["input_ids", "act_threshold", "compaction_cutoff"] and meta["compaction"] == mode
    default = 1.0 if mode == "on" else DEFAULT_COMPACTION_CUTOFF
    assert float(meta["compaction_cutoff"]) == default
    with torch.no_grad():
        running = (~model(samples()[0], threshold=0.9).depth.eq(1)).sum(1).max().item() / ids.shape[1]
    assert 0 < running < 1
    expected = "compacted" if running <= default else "dense"
    assert _ran(tmp_path / "m.onnx", partly) == {expected}  # the default, chosen in the graph
    assert _ran(tmp_path / "m.onnx", {**partly, "compaction_cutoff": np.array(0.0, np.float32)}) == {"dense"}
    assert _ran(tmp_path / "m.onnx", {**partly, "compaction_cutoff": np.array(1.0, np.float32)}) == {"compacted"}
    everyone = {**partly, "act_threshold": np.array(1.0, np.float32), "compaction_cutoff": np.array(0.99, np.float32)}
    assert _ran(tmp_path / "m.onnx", everyone) == {"dense"}  # nothing halted: the share is 1


def test_threshold_is_an_optional_input_defaulting_to_the_trained_value(tmp_path):
    model = tiny("layernorm", "act")
    export_model(model, tmp_path / "m.onnx", samples=samples(), compaction="off")
    engine = Engine(tmp_path / "m.onnx")
    ids = samples()[0].numpy()
    default = engine.session.run(None, {"input_ids": ids})
    explicit = engine.infer(ids, 0.9)
    assert int(default[1]) == explicit.layers_executed and np.array_equal(default[2], explicit.token_depth)
    low = engine.infer(ids, 0.05)
    assert low.layers_executed <= explicit.layers_executed and low.mean_token_depth < explicit.mean_token_depth
    assert engine.infer(ids, 1.0).layers_executed == 2


@pytest.mark.parametrize("norm", ["dyt", "adyt"])
def test_dyt_affine_is_folded_into_the_next_linear(norm):
    model = tiny(norm, "act")
    folded = fold_norms(model)
    assert type(folded.blocks[0].norm_attn).__name__ == "ScaledTanh"
    assert type(folded.norm_final).__name__ == "ScaledTanh"
    assert folded.blocks[0].attn.qkv.bias is not None  # the norm's shift moved here
    assert model.embed.scale is not None and type(folded.embed) is nn.Embedding  # the embedding scale folded in
    with torch.no_grad():
        model.embed.scale.mul_(1.7)  # a trained scale, not the initial sqrt(d_model)
    folded = fold_norms(model)
    ids = samples()[0]
    with torch.no_grad():
        a = model(ids, threshold=0.9)
        b = folded(ids, threshold=0.9)
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    assert a.layers_executed == b.layers_executed and torch.equal(a.depth, b.depth)


def test_a_mismatch_refuses_to_write(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "LOGITS_TOLERANCE", -1.0)
    with pytest.raises(ExportError, match="disagrees with PyTorch"):
        export_model(tiny("rmsnorm", "act"), tmp_path / "m.onnx", samples=samples()[:1], compaction="off")
    assert os.listdir(tmp_path) == []  # nothing written, no temporary left behind


class DataDependentNorm(nn.Module):
    """A norm whose Python control flow depends on the data: it cannot be exported."""

    def __init__(self, num_features, position="attn"):
        super().__init__()
        self.inner = nn.LayerNorm(num_features)

    def forward(self, x):
        if float(x.abs().max()) > 1e9:
            return x
        return self.inner(x)


def test_a_plugin_that_cannot_export_is_named(tmp_path):
    plugin = types.SimpleNamespace(register_norms=hookimpl(lambda register: register("bad_norm", DataDependentNorm)))
    registry.register_plugin(plugin, "test-bad-norm")
    try:
        torch.manual_seed(0)
        model = PonderLM(ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=2, n_local_heads=1, d_ff=64,
                                     max_seq_len=32, attn_window=8.0), norm=PluginSpec("bad_norm"))
        with pytest.raises(ExportError, match="could not export the model \\(norm 'bad_norm', halting 'act'\\)"):
            export_model(model, tmp_path / "m.onnx")
        assert os.listdir(tmp_path) == []
    finally:
        registry.configure()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    Trainer(load_config(write_tiny_config(folder, steps=6)), folder / "run", progress=False).train()
    return folder / "run"


def test_cli_export_repository_inspect_and_run(trained, tmp_path):
    repo = tmp_path / "models"
    (repo / "tiny" / "1").mkdir(parents=True)  # an earlier version: the export takes the next number
    proc = run_ponder("export", str(trained), "--repository", str(repo), "--name", "tiny")
    assert "checked 24 runs against PyTorch" in proc.stdout  # 2 shapes x 4 thresholds x 3 compaction cutoffs
    assert "decode steps through the KV cache against PyTorch" in proc.stdout
    assert sorted(p.name for p in (repo / "tiny" / "2").iterdir()) == ["config.json", "decode.onnx", "model.onnx"]
    assert [p.name for p in (repo / "tiny").iterdir() if p.name.startswith(".")] == []  # no staging left
    config = json.loads((repo / "tiny" / "2" / "config.json").read_text())
    assert config["tokenizer"] == {"kind": "byte"} and config["defaults"]["act_threshold"] == 0.9
    assert config["version"] == 2 and config["n_layers"] == 3
    meta = read_metadata(repo / "tiny" / "2" / "model.onnx")
    assert meta["n_layers"] == 3 and meta["halting"]["name"] == "act" and meta["ponder_version"]
    assert meta["tokenizer"] == {"kind": "byte", "vocab_size": 256} and meta["compaction"] == "auto"
    shown = run_ponder("inspect", str(repo / "tiny" / "2" / "model.onnx")).stdout
    assert "n_layers: 3" in shown and "act_threshold: float[]" in shown and "token_depth: int64[batch, seq]" in shown
    assert "decode graph (decode.onnx)" in shown and "past_key_values.{0..2}.key: float[batch, 2, past, 16]" in shown
    assert "present.{0..2}.value: float[batch, 2, total, 16]" in shown
    out = run_ponder("run", str(repo / "tiny" / "2" / "model.onnx"), "--text", "The if statement", "--tokens", "3",
                     "-t", "1.0").stdout
    assert "3 tokens (length); depth per token [3, 3, 3]" in out and "first token" in out and "tokens/s" in out
    sampled = [run_ponder("run", str(repo / "tiny" / "2"), "--text", "The", "--max-tokens", "6", "--temperature",
                          "1.5", "--seed", "1").stdout.splitlines()[0] for _ in range(2)]
    assert sampled[0] == sampled[1]  # the same seed, the same text
    proc = run_ponder("export", str(trained), "--repository", str(repo), "--name", "tiny", "--version", "2",
                      check=False)
    assert proc.returncode == 2 and "already exists: choose another --version" in proc.stderr


def test_cli_export_lone_file_without_check(trained, tmp_path):
    proc = run_ponder("export", str(trained), "-o", str(tmp_path / "lone.onnx"), "--skip-check", "--compaction", "off")
    assert "checked" not in proc.stdout
    assert (tmp_path / "lone.onnx").is_file() and not (tmp_path / "lone.json").exists()  # bytes need no vocabulary
    assert Engine(tmp_path / "lone.onnx").infer(np.zeros((1, 4), dtype=np.int64), 1.0).layers_executed == 3


def test_cli_errors_are_one_line_and_leave_nothing(trained, tmp_path):
    repo = tmp_path / "repo"
    proc = run_ponder("export", str(tmp_path / "nothing"), "--repository", str(repo), "--name", "x", check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr

    broken = tmp_path / "broken"
    ckpt = next((trained / "checkpoints").iterdir())
    import shutil

    shutil.copytree(ckpt, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:100])
    proc = run_ponder("export", str(broken), "--repository", str(repo), "--name", "x", check=False)
    assert proc.returncode == 2 and "is corrupt" in proc.stderr

    unknown = tmp_path / "unknown"
    shutil.copytree(ckpt, unknown)
    config = json.loads((unknown / "config.json").read_text())
    config["run"]["norm"] = {"name": "fancynorm"}
    (unknown / "config.json").write_text(json.dumps(config))
    proc = run_ponder("export", str(unknown), "--repository", str(repo), "--name", "x", check=False)
    assert proc.returncode == 2 and "unknown norm 'fancynorm'" in proc.stderr

    assert not (repo / "x").exists() or not any((repo / "x").iterdir())

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = run_ponder("export", str(trained), "-o", str(blocker / "m.onnx"), check=False)
    assert proc.returncode == 2 and "cannot create" in proc.stderr and "Traceback" not in proc.stderr

    proc = run_ponder("run", str(tmp_path / "missing.onnx"), "--text", "hi", check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = run_ponder("export", str(trained), "--repository", str(repo), check=False)
    assert proc.returncode == 2 and "--repository needs --name" in proc.stderr
    proc = run_ponder("export", str(trained), "-o", str(tmp_path / "m.onnx"), "--compaction", "sometimes", check=False)
    assert proc.returncode == 2 and "invalid choice: 'sometimes'" in proc.stderr and not (tmp_path / "m.onnx").exists()


def test_an_unwritable_folder_is_a_one_line_error(trained, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root): permissions cannot be tested")
        proc = run_ponder("export", str(trained), "-o", str(locked / "m.onnx"), check=False)
        assert proc.returncode == 2 and "is not writable" in proc.stderr
        assert not list(locked.iterdir())
    finally:
        locked.chmod(0o700)
