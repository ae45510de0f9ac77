"""Training: it learns, it is deterministic, it resumes exactly, it checkpoints atomically."""

from __future__ import annotations

import json
import types

import pytest
import torch
from helpers import run_ponder, write_tiny_config
from safetensors.torch import load_file

from ponder import checkpoint, registry
from ponder.config import load_config
from ponder.errors import CheckpointError, ConfigError
from ponder.registry import hookimpl
from ponder.train import Trainer


def weights(run_dir):
    return load_file(str(checkpoint.resolve(run_dir) / checkpoint.MODEL))


def test_training_lowers_validation_loss(tmp_path):
    run = load_config(write_tiny_config(tmp_path, steps=60))
    trainer = Trainer(run, tmp_path / "run", progress=False)
    before = trainer.validate()["loss"]
    after = trainer.train()["loss"]
    assert after < before - 0.5, (before, after)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_records] == list(range(2, 61, 2))
    assert all(1 <= r["layers_executed"] <= 3 and 1 <= r["mean_token_depth"] <= 3 for r in records)
    assert {r["step"] for r in records if r["split"] == "valid"} == set(range(4, 61, 4))


@pytest.mark.parametrize("norm", ["layernorm", "dyt"])  # dyt: two optimizer groups (alpha at 10x the lr)
def test_resume_equals_a_straight_run(tmp_path, norm):
    cfg = write_tiny_config(tmp_path, steps=8)
    cfg.write_text(cfg.read_text() + f'\n[norm]\nname = "{norm}"\n')
    Trainer(load_config(cfg), tmp_path / "straight", progress=False).train()
    Trainer(load_config(cfg), tmp_path / "split", progress=False, steps=4).train()
    resumed = Trainer(None, tmp_path / "split", resume=True, progress=False, steps=8)
    assert resumed.step == 4
    resumed.train()
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = checkpoint.read_trainer_state(checkpoint.resolve(tmp_path / "straight"))
    sb = checkpoint.read_trainer_state(checkpoint.resolve(tmp_path / "split"))
    assert sa["step"] == sb["step"] == 8
    assert len(sb["optimizer"]["param_groups"]) == (2 if norm == "dyt" else 1)
    for pid, st in sa["optimizer"]["state"].items():
        assert torch.equal(st["exp_avg_sq"], sb["optimizer"]["state"][pid]["exp_avg_sq"])


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    cfg = write_tiny_config(tmp_path, steps=4)
    Trainer(load_config(cfg), tmp_path / "a", progress=False).train()
    Trainer(load_config(cfg), tmp_path / "b", progress=False).train()
    other = load_config(cfg)
    other.train.seed = 4
    Trainer(other, tmp_path / "c", progress=False).train()
    a, b, c = weights(tmp_path / "a"), weights(tmp_path / "b"), weights(tmp_path / "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_a_kill_mid_write_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = write_tiny_config(tmp_path, steps=8)
    trainer = Trainer(load_config(cfg), tmp_path / "run", progress=False, steps=4)
    trainer.train()
    good = checkpoint.resolve(tmp_path / "run")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if killed while writing the model file

    monkeypatch.setattr(checkpoint, "save_file", crash)
    trainer.step = 5
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    assert checkpoint.resolve(tmp_path / "run") == good
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == [good.name]
    model, _, _ = checkpoint.load_model(tmp_path / "run")
    assert model.cfg.n_layers == 3


def test_corrupt_and_foreign_checkpoints_are_clear_errors(tmp_path):
    cfg = write_tiny_config(tmp_path, steps=4)
    Trainer(load_config(cfg), tmp_path / "run", progress=False).train()
    ckpt = checkpoint.resolve(tmp_path / "run")
    data = (ckpt / checkpoint.MODEL).read_bytes()
    (ckpt / checkpoint.MODEL).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors' is corrupt"):
        checkpoint.load_model(tmp_path / "run")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(CheckpointError, match="is not a ponder checkpoint"):
        checkpoint.load_model(foreign)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load_model(tmp_path / "missing")


def test_refuses_to_overwrite_a_run_without_resume(tmp_path):
    cfg = write_tiny_config(tmp_path, steps=4)
    Trainer(load_config(cfg), tmp_path / "run", progress=False).train()
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        Trainer(load_config(cfg), tmp_path / "run", progress=False)


class StepCounter:
    """A controller that nudges rope_base after each step and remembers what it saw."""

    def __init__(self, factor: float = 1.01) -> None:
        self.factor = factor
        self.events: list[tuple[str, int]] = []
        self.steps_seen = 0

    def after_backward(self, event):
        assert all(p.grad is not None for p in event.model.blocks[0].parameters())
        self.events.append(("after_backward", event.step))

    def after_step(self, event):
        self.steps_seen += 1
        event.dials.set("rope_base", event.dials.value("rope_base") * self.factor)
        self.events.append(("after_step", event.step))

    def after_eval(self, event):
        self.events.append(("after_eval", event.step))

    def state_dict(self):
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state):
        self.steps_seen = state["steps_seen"]


@pytest.fixture
def counter_plugin():
    plugin = types.SimpleNamespace(register_controllers=hookimpl(
        lambda register: register("step_counter", StepCounter, description="test controller")))
    registry.register_plugin(plugin, "test-counter")
    yield
    registry.configure()


def test_controllers_run_at_their_events_and_resume_with_their_state(tmp_path, counter_plugin):
    cfg = write_tiny_config(tmp_path, steps=8, extra='\n[[controllers]]\nname = "StepCounter"\nfactor = 1.5\n')
    trainer = Trainer(load_config(cfg), tmp_path / "run", progress=False, steps=4)
    trainer.train()
    ctrl = trainer.controllers[0]
    assert ctrl.events[:3] == [("after_backward", 0), ("after_step", 1), ("after_backward", 1)]
    assert ("after_eval", 4) in ctrl.events
    assert trainer.model.dials.value("rope_base") == pytest.approx(10000 * 1.5 ** 4)
    resumed = Trainer(None, tmp_path / "run", resume=True, progress=False, steps=8)
    assert resumed.controllers[0].steps_seen == 4
    assert resumed.model.dials.value("rope_base") == pytest.approx(10000 * 1.5 ** 4)
    resumed.train()
    assert resumed.controllers[0].steps_seen == 8


@pytest.mark.parametrize(("edit", "message"), [
    (('name = "act"', 'name = "actt"'), "unknown halting 'actt'; did you mean 'act'?"),
    (('name = "act"', 'name = "act"\nact_lambda = "high"'), "parameter 'act_lambda' got 'high'"),
    (("act_threshold = 0.9", "act_threshold = 1.5"), "model.act_threshold = 1.5 is outside (0, 1]"),
    (("act_threshold = 0.9", "act_threshold = 0.0"), "model.act_threshold = 0.0 is outside (0, 1]"),
    (('source = "text"', 'source = "wikitext2"'), "WikiText-2 folder"),
    (("batch_size = 4", "batch_size = 4\nsteps_per_epoch = 3"), "[train] has unknown key(s) steps_per_epoch"),
    (('lr = 0.003', 'lr = 0.003\nbetas = 0.9'), "parameter 'betas' got 0.9 (float), expected tuple or list"),
])
def test_bad_configs_exit_with_one_line(tmp_path, edit, message):
    cfg = write_tiny_config(tmp_path)
    text = cfg.read_text()
    assert edit[0] in text
    cfg.write_text(text.replace(edit[0], edit[1], 1))
    proc = run_ponder("train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-progress", check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("ponder: error: ")
    assert message in proc.stderr
    assert not (tmp_path / "run").exists()


def test_missing_text_file_is_one_line(tmp_path):
    cfg = write_tiny_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("corpus.txt", "nothere.txt"))
    proc = run_ponder("train", "--config", str(cfg), "--out", str(tmp_path / "run"), check=False)
    assert proc.returncode == 2 and "nothere.txt' does not exist" in proc.stderr and "Traceback" not in proc.stderr
