"""A plugin of each kind, written from the contracts alone (tests/plugin_dists/ponder-kit-*), installed as a real
distribution and used through train -> export -> serve: the norm is folded at export and brings its controller,
the optimizer and the controller run in training, and the halting rule of its own exports and serves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tritonclient.grpc as triton
from helpers import listing, run_ponder, write_tiny_config

KITS = ("ponder-kit-norm", "ponder-kit-optim", "ponder-kit-control", "ponder-kit-halt")


@pytest.fixture(scope="module")
def kit(plugin_dists, tmp_path_factory):
    """A run trained with the four plugins, and its export into a model repository."""
    paths = [plugin_dists[name] for name in KITS]
    folder = tmp_path_factory.mktemp("kit")
    config = write_tiny_config(folder, steps=4, halting='name = "halving"\ncost = 0.02')
    text = config.read_text().replace('name = "adamw"\nlr = 0.003', 'name = "counted-sgd"\nlr = 0.05')
    config.write_text(text + '\n[norm]\nname = "softsign-norm"\nscale = 0.8\n')
    trained = run_ponder("train", "--config", str(config), "--out", str(folder / "run"), "--no-progress",
                         paths=paths, timeout=300)
    exported = run_ponder("export", str(folder / "run"), "--repository", str(folder / "models"), "--name", "kit-model",
                          paths=paths, timeout=300)
    return {"paths": paths, "folder": folder, "train": trained, "export": exported}


def test_the_four_kits_are_found_through_their_entry_points(plugin_dists):
    data = listing(paths=[plugin_dists[name] for name in KITS])
    found = {(p["kind"], p["name"], p["distribution"]) for p in data["plugins"] if p["distribution"] in KITS}
    assert found == {("norm", "softsign-norm", "ponder-kit-norm"), ("optimizer", "counted-sgd", "ponder-kit-optim"),
                     ("controller", "event-counter", "ponder-kit-control"), ("halting", "halving", "ponder-kit-halt")}
    assert data["failures"] == []


def test_training_uses_every_plugin_and_adds_the_controller_the_norm_needs(kit):
    out = kit["train"].stdout + kit["train"].stderr
    assert "'event-counter' controller" in out  # added by capability: the config lists no controller
    run = kit["folder"] / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert train[-1]["optimizer"] == {"steps_taken": 4}  # the plugin's optimizer took every step
    assert any("scale" in m for m in train[-1]["norms"].values())  # the plugin's norm reports itself
    script = textwrap.dedent(f"""
        import json
        from ponder.checkpoint import read_trainer_state, resolve
        state = read_trainer_state(resolve({str(run)!r}))
        print(json.dumps({{"controllers": state["controllers"], "dials": state["dials"]}}))
    """)
    saved = json.loads(_python(script, kit["paths"]))
    assert saved["controllers"] == [{"counts": {"on_train_start": 1, "after_backward": 4, "after_step": 4,
                                                "after_eval": 1}}]
    assert saved["dials"]["rope_base"] > 10000.0  # turned through event.dials after each evaluation


def test_the_foldable_norm_is_folded_at_export_and_computes_the_same(kit):
    run = kit["folder"] / "run"
    script = textwrap.dedent(f"""
        import torch
        from ponder.checkpoint import load_model
        from ponder.export import fold_norms
        model, _, _ = load_model({str(run)!r})
        folded = fold_norms(model)
        ids = torch.randint(0, model.cfg.vocab_size, (2, 16))
        with torch.no_grad():
            diff = (model(ids).logits - folded(ids).logits).abs().max().item()
        print(type(model.blocks[0].norm_attn).__name__, type(folded.blocks[0].norm_attn).__name__,
              type(folded.norm_final).__name__, diff)
    """)
    before, after, final, diff = _python(script, kit["paths"]).split()
    assert (before, after, final) == ("SoftsignNorm", "Softsign", "Softsign")
    assert float(diff) < 1e-4
    assert "wrote" in kit["export"].stdout  # and the export's own check (ONNX Runtime against PyTorch) passed


def test_the_halting_rule_of_its_own_serves(kit):
    from ponder.serve.server import create_server

    root = kit["folder"] / "models"
    assert (root / "kit-model" / "1" / "model.onnx").is_file()
    server, port = create_server(root, "127.0.0.1:0", workers=1)
    server.start()
    try:
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_model_ready("kit-model")
        ids = np.frombuffer(b"the halting rule of its own serves", dtype=np.uint8)[None, :32].astype(np.int64)
        tensor = triton.InferInput("input_ids", list(ids.shape), "INT64")
        tensor.set_data_from_numpy(ids)
        depths = {}
        for threshold in (0.3, 1.0):
            result = client.infer("kit-model", [tensor], parameters={"act_threshold": threshold})
            depths[threshold] = result.as_numpy("token_depth")
        client.close()
    finally:
        server.drain(grace=1)
    assert depths[1.0].shape == ids.shape and np.all(depths[1.0] == 3)  # full depth: every layer
    assert np.all((depths[0.3] >= 1) & (depths[0.3] <= 3)) and depths[0.3].mean() < 3  # the rule halts early


def _python(script: str, paths) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PONDER_")}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in paths)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()
