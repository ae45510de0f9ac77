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


def tiny(norm: str, halting: str, seed: int = 0, n_layers: int = 2) -> PonderLM:
    """A small model with its parameters spread out, so tokens halt at different depths and folding matters."""
    torch.manual_seed(seed)
    params = {} if halting == "fixed" else {"bias_init": 2.0}  # most tokens halt after layer 1 at low thresholds
    # DyT and ADyT at alpha 0.5 rather than their width-32 default (8.84): inputs spread over tanh's S, not its tails
    norm_params = {"alpha_init_value": 0.5} if norm in ("dyt", "adyt") else {}
    model = PonderLM(ModelConfig(vocab_size=40, d_model=32, n_layers=n_layers, n_heads=2, n_local_heads=1, d_ff=64,
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
    # and per cutoff (on the first shape) the batching inputs, against PyTorch: a threshold per row, the rows
    # right-padded (scoring), or left-padded through a prefill and three steps (decode)
    batched = [c for c in report.batched_checks if c["graph"] == "scoring"]
    assert len(batched) == 3 and all(min(c["row_lengths"]) < c["shape"][1] for c in batched)
    assert len(report.batched_checks) == 3 + 3 * 4
    assert all(c["max_logit_diff"] <= 1e-4 and c["depth_equal"] and c["layers_executed"] == c["torch_layers_executed"]
               for c in report.batched_checks)
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
        assert inputs == ["input_ids", "act_threshold", "row_threshold", "row_lengths"] and meta["compaction"] == "off"
        assert _ran(tmp_path / "m.onnx", partly) == {"dense"}
        return
    assert inputs == ["input_ids", "act_threshold", "compaction_cutoff", "row_threshold", "row_lengths"]
    assert meta["compaction"] == mode
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


@pytest.fixture(scope="module")
def batching(model_repository):
    """The serving tests' 3-layer compacting export with its decode graph (the parity test checks the batching
    inputs against PyTorch), its PyTorch model, and ONNX Runtime sessions on both graphs."""
    from conftest import served_model

    from ponder.export import session
    from ponder.model_repository import decode_path

    path = model_repository / "tiny" / "1" / "model.onnx"
    return served_model(), path, session(path), session(decode_path(path))


def _scores(sess, ids, **feed):
    extra = {k: np.asarray(v, np.int64 if k == "row_lengths" else np.float32) for k, v in feed.items()}
    logits, layers, depth = sess.run(None, {"input_ids": np.asarray(ids, np.int64), **extra})
    return logits, int(layers), depth


@pytest.mark.parametrize("cutoff", [0.0, DEFAULT_COMPACTION_CUTOFF, 1.0])
def test_a_padded_batch_gives_each_row_its_unbatched_answer(batching, cutoff):
    """Rows of different lengths, right-padded into one batch, each at its own threshold (``row_threshold``,
    ``row_lengths``): each row's logits, token depths and layer count are those of the row run alone."""
    model, path, sess, _ = batching
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 40, (4, 14), generator=gen).numpy()
    lengths, thresholds = [14, 9, 5, 2], [0.9, 0.5, 1.0, 0.05]
    logits, layers, depth = _scores(sess, ids, row_threshold=thresholds, row_lengths=lengths,
                                    compaction_cutoff=cutoff)
    deepest = []
    for r, (n, threshold) in enumerate(zip(lengths, thresholds, strict=True)):
        alone = _scores(sess, ids[r:r + 1, :n], act_threshold=threshold, compaction_cutoff=cutoff)
        assert np.abs(logits[r, :n] - alone[0][0]).max() <= 1e-5, r
        assert np.array_equal(depth[r, :n], alone[2][0]) and not depth[r, n:].any(), r  # padding: depth 0
        assert depth[r].max() == alone[1], r  # the row's own layer count is its deepest token's depth
        deepest.append(alone[1])
    assert layers == max(deepest) == depth.max()
    assert len(set(deepest)) > 1  # the rows really halt at different depths
    # a row <= 0 takes act_threshold (the scalar an old caller feeds, or the trained one)
    mixed = _scores(sess, ids, act_threshold=0.5, row_threshold=[0.0, 0.5, 0.0, 0.5], compaction_cutoff=cutoff)
    same = _scores(sess, ids, act_threshold=0.5, compaction_cutoff=cutoff)
    assert np.array_equal(mixed[0], same[0]) and np.array_equal(mixed[2], same[2]) and mixed[1] == same[1]


def test_padding_never_runs_a_layer(batching):
    """A batch whose real tokens all halted stops, however deep its padding would have run."""
    model, path, sess, _ = batching
    ids = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(6)).numpy()
    unpadded = _scores(sess, ids, act_threshold=1.0)
    assert unpadded[1] == 3 and (unpadded[2] == 3).all()  # every token runs every layer at 1.0 ...
    short = _scores(sess, ids, row_threshold=[0.05, 0.05], row_lengths=[3, 2])
    alone = [_scores(sess, ids[r:r + 1, :n], act_threshold=0.05) for r, n in enumerate([3, 2])]
    assert short[1] == max(a[1] for a in alone) < 3  # ... the real tokens halted early: so did the batch
    padded = _scores(sess, ids, row_threshold=[1.0, 0.05], row_lengths=[16, 2])
    assert padded[1] == 3 and (padded[2][1, :2] == alone[1][2][0]).all() and not padded[2][1, 2:].any()
    with torch.no_grad():  # PyTorch's forward takes the same per-row thresholds and lengths
        ref = model(torch.from_numpy(ids), threshold=torch.tensor([1.0, 0.05]), lengths=torch.tensor([16, 2]))
    assert ref.layers_executed == 3 and np.array_equal(ref.depth.to(torch.int64).numpy(), padded[2])


def test_a_left_padded_decode_batch_gives_each_row_its_unbatched_steps(batching):
    """The decode graph: prompts of different lengths left-padded into one prefill (padding starts halted), each
    row at its own threshold (``row_threshold``), then steps through the cache: each row's logits, depths and
    layer count are those of the row decoded alone."""
    from ponder.decode_graph import cache_names

    model, path, _, dec = batching
    cfg = model.cfg
    past_names, present_names = cache_names(cfg.n_layers)
    names = [o.name for o in dec.get_outputs()]
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, 40, (n,), generator=gen).numpy() for n in (9, 4, 6)]
    thresholds = [0.9, 0.05, 1.0]
    nxt = torch.randint(0, 40, (3, 2), generator=gen).numpy()
    empty = np.zeros((1, cfg.n_heads, 0, cfg.d_model // cfg.n_heads), np.float32)

    def run(ids, mask, cache, **feed):
        out = dec.run(None, {"input_ids": ids, "attention_mask": mask, **dict(zip(past_names, cache, strict=True)),
                             **{k: np.asarray(v, np.float32) for k, v in feed.items()}})
        out = dict(zip(names, out, strict=True))
        return out, [out[p] for p in present_names]

    width = max(len(p) for p in prompts)
    ids = np.stack([np.pad(p, (width - len(p), 0)) for p in prompts])
    mask = np.stack([np.pad(np.ones(len(p), np.int64), (width - len(p), 0)) for p in prompts])
    batch, cache = run(ids, mask, [np.repeat(empty, 3, 0)] * len(past_names), row_threshold=thresholds)
    alone = [run(p[None], np.ones((1, len(p)), np.int64), [empty] * len(past_names), act_threshold=t)
             for p, t in zip(prompts, thresholds, strict=True)]
    depths = set()
    for step in range(nxt.shape[1] + 1):
        for r in range(len(prompts)):
            own, _ = alone[r]
            real = len(own["token_depth"][0])
            assert np.abs(batch["logits"][r, -real:] - own["logits"][0]).max() <= 1e-5, (step, r)
            assert np.array_equal(batch["token_depth"][r, -real:], own["token_depth"][0]), (step, r)
            assert not batch["token_depth"][r, :-real].any()  # left padding of the prefill: depth 0
            assert batch["token_depth"][r].max() == int(own["layers_executed"]), (step, r)
            depths.add(int(own["layers_executed"]))
        assert int(batch["layers_executed"]) == batch["token_depth"].max()
        if step == nxt.shape[1]:
            break
        mask = np.concatenate([mask, np.ones((3, 1), np.int64)], 1)
        batch, cache = run(nxt[:, step:step + 1], mask, cache, row_threshold=thresholds)
        alone = [run(nxt[r:r + 1, step:step + 1], np.ones((1, len(p) + step + 1), np.int64), alone[r][1],
                     act_threshold=t) for r, (p, t) in enumerate(zip(prompts, thresholds, strict=True))]
    assert len(depths) > 1


def test_batching_is_in_the_metadata_and_old_feeds_still_work(batching):
    model, path, sess, dec = batching
    from ponder.model_repository import decode_path

    meta = read_metadata(path)
    assert meta["batching"] == {"row_threshold": True, "row_lengths": True}
    assert [name for name, _ in meta["inputs"]][-2:] == ["row_threshold", "row_lengths"]
    assert ("act_threshold", "float[]") in meta["inputs"] and ("row_lengths", "int64[batch]") in meta["inputs"]
    decode_meta = read_metadata(decode_path(path))
    assert decode_meta["batching"] == {"row_threshold": True, "padding_halts": True}
    assert [name for name, _ in decode_meta["inputs"]][-1] == "row_threshold"
    ids = samples()[0]
    engine = Engine(path)  # what a caller of an older export feeds: a scalar threshold, nothing else
    with torch.no_grad():
        ref = model(ids, threshold=0.5)
    out = engine.infer(ids.numpy(), 0.5)
    assert np.abs(out.logits - ref.logits.numpy()).max() <= 1e-4 and out.layers_executed == ref.layers_executed


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
