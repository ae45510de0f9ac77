"""Controllers: the loss-driven dials (seed 003) step by step, LR schedules, and resume."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from helpers import run_ponder, write_tiny_config

from ponder import registry
from ponder.config import ModelConfig, PluginSpec, load_config
from ponder.model import PonderLM
from ponder.train import Trainer


def tiny_model(**cfg) -> PonderLM:
    torch.manual_seed(0)
    base = dict(vocab_size=30, d_model=16, n_layers=3, n_heads=4, n_local_heads=2, d_ff=32, max_seq_len=64,
                attn_window=40.0)
    return PonderLM(ModelConfig(**{**base, **cfg}), halting=PluginSpec("fixed"))


def event(model, loss, step):
    return SimpleNamespace(loss=loss, step=step, dials=model.dials, log=lambda line: None)


def test_autonomic_follows_the_rule_step_by_step():
    model = tiny_model()
    ctrl = registry.create("controller", "autonomic", beta=0.9, factor=1.005, threshold=0.01,
                           dials={"rope_base": {"min": 9990.0}, "attn_window": {"max": 40.5}})
    base, window, running = 10000.0, 40.0, None
    for step, loss in enumerate([5.0, 4.0, 3.9, 3.95, 4.5, 5.0, 5.2, 5.2, 6.0, 7.0, 8.0, 9.0], start=1):
        ctrl.after_step(event(model, loss, step))
        running = loss if running is None else 0.9 * running + 0.1 * loss  # one EWMA a step, not one per dial
        delta = loss - running
        if delta < -0.01:
            base, window = base * 1.005, window * 1.005
        elif delta > 0.01:
            base, window = base / 1.005, window / 1.005
        base, window = max(base, 9990.0), min(window, 40.5)
        assert ctrl.running == pytest.approx(running)
        assert model.dials.value("rope_base") == pytest.approx(base), step
        assert model.dials.value("attn_window") == pytest.approx(window), step
    assert model.dials.value("rope_base") == 9990.0  # held at its min by the end
    assert ctrl.steps == 12


def test_the_window_grows_as_a_float_and_is_rounded_only_where_used():
    model = tiny_model()
    ctrl = registry.create("controller", "autonomic", dials={"attn_window": {}}, beta=0.9)
    loss = 5.0
    for step in range(1, 41):  # a falling loss: every step below its running average
        ctrl.after_step(event(model, loss, step))
        loss *= 0.97
    window = model.dials["attn_window"]
    assert window.value == pytest.approx(40 * 1.005 ** 39)  # the first step only sets the EWMA
    assert window.value > 48 and window.as_int() == round(window.value)
    assert model.dials.value("rope_base") == 10000.0  # not listed, not touched


def test_a_dial_change_reaches_every_attention_module():
    model = tiny_model()
    ids = torch.randint(0, 30, (2, 60))
    model.dials.set("rope_base", 12345.6)
    model.dials.set("attn_window", 17.4)  # used as 17
    reference = tiny_model(rope_base=12345.6, attn_window=17.0)
    reference.load_state_dict(model.state_dict())
    assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-6)
    stale = tiny_model()
    stale.load_state_dict(model.state_dict())
    assert not torch.allclose(model(ids).logits, stale(ids).logits, atol=1e-4)


def test_bad_autonomic_settings_are_named():
    with pytest.raises(registry.PluginParameterError, match=r"dials.rope_base has unknown key\(s\) \['mn'\]"):
        registry.create("controller", "autonomic", dials={"rope_base": {"mn": 1}})
    with pytest.raises(registry.PluginParameterError, match="beta must be in"):
        registry.create("controller", "autonomic", beta=1.5)


def test_warmup_cosine_sets_the_lr_from_the_step_and_resumes_at_the_right_rate():
    def lrs(start, steps, total=20):
        param = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD([param], lr=1.0)
        ctrl = registry.create("controller", "warmup-cosine", warmup_steps=4, min_lr_ratio=0.1)
        ctrl.on_train_start(SimpleNamespace(optimizer=opt, total_steps=total, step=start))
        seen = []
        for _ in range(steps):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            ctrl.after_step(None)
        return seen

    straight = lrs(0, 20)
    assert straight[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert straight[4] == pytest.approx(1.0) and straight[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(
        math.pi * 15 / 16)))
    assert lrs(7, 13) == pytest.approx(straight[7:])  # a run resumed at step 7


def test_step_schedule():
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=1.0)
    ctrl = registry.create("controller", "step", step_size=3, gamma=0.5)
    ctrl.on_train_start(SimpleNamespace(optimizer=opt, total_steps=10, step=0))
    seen = []
    for _ in range(7):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        ctrl.after_step(None)
    assert seen == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]


def test_controllers_listed_by_name_run_in_order_and_resume(tmp_path):
    cfg = write_tiny_config(tmp_path, steps=12)
    schedule = '{name = "warmup-cosine", warmup_steps = 4, total_steps = 12}'
    cfg.write_text(f'controllers = [{schedule}, "autonomic"]\n' + cfg.read_text())
    run = load_config(cfg)
    assert [c.name for c in run.controllers] == ["warmup-cosine", "autonomic"]
    straight = Trainer(run, tmp_path / "straight", progress=False)
    straight.train()
    Trainer(load_config(cfg), tmp_path / "split", progress=False, steps=6).train()
    resumed = Trainer(None, tmp_path / "split", resume=True, progress=False, steps=12)
    auto = resumed.controllers[1]
    assert auto.steps == 6 and auto.running is not None
    assert resumed.model.dials.value("rope_base") != run.model.rope_base  # restored, not the initial value
    resumed.train()
    assert resumed.model.dials.snapshot() == straight.model.dials.snapshot()
    assert resumed.controllers[1].running == straight.controllers[1].running
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r["split"] == "train"]
    assert lrs[0] < lrs[2] and lrs[-1] < max(lrs)  # warm-up then decay, from the schedule (the trainer's is off)


def test_analyze_dials_cli(tmp_path):
    cfg = write_tiny_config(tmp_path, steps=8)
    cfg.write_text('controllers = ["autonomic"]\n' + cfg.read_text())
    Trainer(load_config(cfg), tmp_path / "run", progress=False).train()
    proc = run_ponder("analyze", "dials", str(tmp_path / "run"))
    report = json.loads((tmp_path / "run" / "dials.json").read_text())
    assert [d["dial"] for d in report["dials"]] == ["rope_base", "attn_window", "act_threshold"]
    assert "rope_base" in proc.stdout
    assert (tmp_path / "run" / "dials.png").read_bytes()[:4] == b"\x89PNG"


def test_unknown_dial_is_a_one_line_error(tmp_path):
    cfg = write_tiny_config(tmp_path, steps=2)
    cfg.write_text(cfg.read_text() + '\n[[controllers]]\nname = "autonomic"\n[controllers.dials.rope]\nfactor = 1.1\n')
    proc = run_ponder("train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-progress", check=False)
    assert proc.returncode == 2
    assert "autonomic: the model has no dial 'rope'; its dials: rope_base, attn_window, act_threshold" in proc.stderr
