"""ponder inside Hugging Face transformers: norm conversion, the save / load round trip, PonderCallback in the
Trainer, and DAG's state through the Trainer's checkpoints. Every model is built from a config (no download)."""

from __future__ import annotations

import copy
import json
import math
import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="needs Hugging Face transformers: pip install 'ponder[hf]'")
pytest.importorskip("accelerate", reason="the HF Trainer needs accelerate: pip install 'ponder[hf]'")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

from ponder import hf  # noqa: E402
from ponder.data import embedded_corpus  # noqa: E402
from ponder.plugins.control.autonomic import Autonomic  # noqa: E402
from ponder.plugins.norm.basic import RMSNorm  # noqa: E402
from ponder.plugins.norm.dyt import AdaptiveDynamicTanh, DynamicTanh  # noqa: E402

transformers.logging.set_verbosity_error()

PLUGIN_CLASS = {"dyt": DynamicTanh, "adyt": AdaptiveDynamicTanh, "rmsnorm": RMSNorm}
SOURCE_CLASS = {"gpt2": nn.LayerNorm, "llama": LlamaRMSNorm}


def tiny(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                          bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                          attn_pdrop=0.0))
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))


def trained_looking(model: nn.Module, seed: int = 1) -> None:
    """Give every norm (and ADyT's G) values other than their initial ones, as a trained model has."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            for name in ("weight", "bias"):
                t = getattr(m, name, None) if isinstance(m, (nn.LayerNorm, LlamaRMSNorm, DynamicTanh)) else None
                if isinstance(t, torch.Tensor):
                    t.copy_(1.0 + 0.3 * torch.randn(t.shape, generator=gen))
            if isinstance(m, AdaptiveDynamicTanh):
                m.grad_norm.fill_(float(torch.rand((), generator=gen)) + 0.5)


def ids(batch: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(7))


class Chunks(torch.utils.data.Dataset):
    """Byte-level windows of the embedded corpus as HF causal-LM examples (the model shifts the labels)."""

    def __init__(self, n: int = 96, seq_len: int = 32) -> None:
        data = torch.tensor(list(embedded_corpus()[: n * seq_len].encode("utf-8")[: n * seq_len]))
        self.rows = data.view(n, seq_len)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def arguments(out, **overrides) -> TrainingArguments:
    settings = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=3e-3,
                    logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                    dataloader_num_workers=0)
    settings.update(overrides)
    return TrainingArguments(**settings)


# -- conversion ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("to", ["dyt", "adyt", "rmsnorm"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_convert_transformers_model(arch, to):
    model = tiny(arch).eval()
    trained_looking(model)
    source = SOURCE_CLASS[arch]
    old = {name: m for name, m in model.named_modules() if type(m) is source}
    assert len(old) == 5  # two per block and the final norm
    x = ids()
    with torch.no_grad():
        before = model(x).logits

    count = hf.convert_pretrained(model, to=to)

    assert count == len(old)
    assert not any(type(m) is source for m in model.modules())
    modules = dict(model.named_modules())
    for name, was in old.items():
        assert type(modules[name]) is PLUGIN_CLASS[to], name
        assert torch.equal(modules[name].weight, was.weight)  # the learned gain is carried over
    assert model.config.ponder_norm == [{"to": to, "source": ["layernorm", "rmsnorm"], "params": {},
                                         "keep_affine": True, "count": count}]
    with torch.no_grad():
        after = model(x).logits
    assert after.shape == (2, 8, 256) and torch.isfinite(after).all()
    if arch == "llama" and to == "rmsnorm":  # the same maths with the carried gain: the same model
        torch.testing.assert_close(after, before)
    else:
        assert not torch.allclose(after, before, atol=1e-3)
    out = model.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 8 + 5) and torch.equal(out[:, :8], x)


def test_rmsnorm_gain_is_carried_only_when_it_is_the_weight():
    import ponder

    class OffsetRMSNorm(nn.Module):  # Gemma's form: scales by 1 + weight
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(n))
            self.eps = 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)

    model = nn.Sequential(nn.Linear(4, 4), OffsetRMSNorm(4))
    with pytest.warns(UserWarning, match="not carried"):
        assert ponder.convert(model, to="dyt", source="rmsnorm") == 1
    assert torch.equal(model[1].weight, torch.ones(4))  # DyT's own initial gain, not Gemma's zeros


# -- save_pretrained / from_pretrained ----------------------------------------------------------------

@pytest.mark.parametrize(("arch", "to"), [("gpt2", "adyt"), ("llama", "dyt")])
def test_save_and_reload_keeps_the_new_norms(tmp_path, arch, to):
    model = tiny(arch).eval()
    hf.convert_pretrained(model, to=to, alpha_init_value=0.7)
    trained_looking(model)
    shard = {"max_shard_size": "20KB"} if arch == "llama" else {}  # the sharded index path for one of them
    model.save_pretrained(tmp_path, **shard)
    assert (tmp_path / ("model.safetensors.index.json" if shard else "model.safetensors")).is_file()

    loaded = hf.from_pretrained(tmp_path)

    assert not loaded.training
    assert {n: type(m) for n, m in loaded.named_modules()} == {n: type(m) for n, m in model.named_modules()}
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    if arch == "gpt2":
        assert loaded.lm_head.weight is loaded.transformer.wte.weight  # tied again
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)

    # plain transformers builds the original norms and drops the new parameters: hence the helper
    plain, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(isinstance(m, DynamicTanh) for m in plain.modules())
    assert any(type(m) is SOURCE_CLASS[arch] for m in plain.modules())
    assert any(k.endswith(".alpha") for k in info["unexpected_keys"])


def test_from_pretrained_of_a_plain_folder_is_plain_transformers(tmp_path):
    tiny("gpt2").save_pretrained(tmp_path)
    loaded = hf.from_pretrained(tmp_path)
    assert isinstance(loaded, GPT2LMHeadModel) and isinstance(loaded.transformer.ln_f, nn.LayerNorm)


def test_from_pretrained_refuses_weights_that_do_not_fit(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny("gpt2")
    hf.convert_pretrained(model, to="dyt")
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["transformer.ln_f.alpha"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Exception, match="transformer.ln_f.alpha"):
        hf.from_pretrained(tmp_path)


# -- PonderCallback in the Trainer ----------------------------------------------------------------------

class Recorder(TrainerCallback):
    """Registered after PonderCallback: what the optimizer really used at each step, and the state at start."""

    def __init__(self, ponder_cb):
        self.ponder_cb = ponder_cb
        self.steps: list[tuple[float, float, float]] = []  # (scheduler lr, dial, lr at optimizer.step)
        self.at_start = None
        self._scheduled = math.nan

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        dag = optimizer.optimizer  # under accelerate's wrapper
        self.at_start = {"optimizer": copy.deepcopy(dag.state_dict()),
                         "ponder": copy.deepcopy(self.ponder_cb.state_dict())}
        dag.register_step_pre_hook(lambda opt, a, k: self.steps.append(
            (self._scheduled, self.ponder_cb.dials.value("lr_scale"), opt.param_groups[0]["lr"])))

    def on_step_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        self._scheduled = lr_scheduler.get_last_lr()[0]


class LossSeen:
    """A controller that keeps the losses it is shown."""

    def __init__(self):
        self.losses: list[float] = []

    def after_step(self, event):
        self.losses.append(event.loss)


def test_trainer_runs_controllers_and_the_lr_dial_acts(tmp_path):
    model = tiny("gpt2")
    hf.convert_pretrained(model, to="adyt")
    adyt = [m for m in model.modules() if isinstance(m, AdaptiveDynamicTanh)]
    seen = LossSeen()
    cb = hf.PonderCallback([("autonomic", {"dials": {"lr_scale": {"threshold": 0.0, "factor": 1.2}}, "beta": 0.5}),
                            seen])
    rec = Recorder(cb)
    opt = hf.make_optimizer(model, "dag", lr=3e-3)
    trainer = Trainer(model=model, args=arguments(tmp_path, gradient_accumulation_steps=2), train_dataset=Chunks(),
                      optimizers=(opt, None), callbacks=[cb, rec])
    trainer.train()

    names = [name for name, _ in cb.controllers]
    assert names == ["autonomic", "lossseen", "adyt"]  # adyt added by itself for the ADyT layers
    assert cb.controllers[2][1].updates == 6  # once per optimizer step
    assert all(float(m.grad_norm) != 1.0 for m in adyt)
    # the lr the optimizer used is the scheduler's times the dial, and the dial moved
    assert len(rec.steps) == 6
    for scheduled, dial, used in rec.steps:
        assert used == pytest.approx(scheduled * dial, rel=1e-12)
    assert {dial for _, dial, _ in rec.steps} != {1.0}
    assert opt.param_groups[0]["lr"] == trainer.lr_scheduler.get_last_lr()[0]  # put back after each step
    # the dials and the controllers' state are in the Trainer's log history
    train_logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(train_logs) == 6
    assert all("dial/lr_scale" in r and "controller/autonomic/running" in r for r in train_logs)
    assert train_logs[-1]["dial/lr_scale"] == cb.dials.value("lr_scale")
    assert train_logs[-1]["controller/autonomic/running"] == cb.controllers[0][1].running
    assert train_logs[-1]["controller/adyt/updates"] == 6 and "optimizer/s_t" in train_logs[-1]
    # the loss the controllers saw is the Trainer's own for each step (two micro-batches each)
    assert seen.losses == pytest.approx([r["loss"] for r in train_logs], rel=1e-5)


def test_lr_setting_controllers_are_refused():
    with pytest.raises(ValueError, match="scheduler owns"):
        hf.PonderCallback(["warmup-cosine"])


def _run(out, *, steps, resume=None, record=True):
    model = tiny("gpt2")
    hf.convert_pretrained(model, to="adyt")
    cb = hf.PonderCallback([Autonomic(dials={"lr_scale": {"threshold": 0.0, "factor": 1.2}}, beta=0.5)])
    rec = Recorder(cb)
    trainer = Trainer(model=model, args=arguments(out, max_steps=steps, save_strategy="steps", save_steps=3),
                      train_dataset=Chunks(), optimizers=(hf.make_optimizer(model, "dag", lr=3e-3), None),
                      callbacks=[cb, rec])
    trainer.train(resume_from_checkpoint=resume)
    return model, cb, rec, trainer.state.log_history


def test_trainer_checkpoint_restores_dag_and_controllers_exactly(tmp_path):
    straight, straight_cb, _, history = _run(tmp_path, steps=6)
    checkpoint = tmp_path / "checkpoint-3"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)  # what the Trainer itself loads
    assert saved["state"][0]["dag_step"] == 3
    saved_ponder = json.loads((checkpoint / hf.STATE_FILE).read_text())
    assert saved_ponder["global_step"] == 3

    resumed, cb, rec, _ = _run(tmp_path, steps=6, resume=str(checkpoint))

    loaded = rec.at_start["optimizer"]
    assert loaded["param_groups"] == saved["param_groups"]
    assert loaded["state"].keys() == saved["state"].keys()
    for pid, entry in saved["state"].items():
        assert loaded["state"][pid].keys() == entry.keys()
        for key, value in entry.items():
            got = loaded["state"][pid][key]
            assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value, (pid, key)
    assert rec.at_start["ponder"] == {k: saved_ponder[k] for k in ("dials", "controllers")}
    assert rec.at_start["ponder"]["controllers"][0]["state"]["steps"] == 3
    logged = next(r for r in history if r["step"] == 3 and "loss" in r)
    assert rec.at_start["ponder"]["dials"]["lr_scale"] == logged["dial/lr_scale"]
    assert rec.at_start["ponder"]["controllers"][0]["state"]["running"] == logged["controller/autonomic/running"]
    assert cb.restored_from == str(checkpoint)
    # and the resumed run ends where the straight run did
    assert cb.state_dict() == straight_cb.state_dict()
    mine, theirs = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_resume_without_saved_controller_state_warns(tmp_path):
    _run(tmp_path, steps=3)
    (tmp_path / "checkpoint-3" / hf.STATE_FILE).unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(tmp_path, steps=4, resume=str(tmp_path / "checkpoint-3"))
    assert any("start afresh" in str(w.message) for w in caught)


def test_without_transformers_the_error_names_the_extra(monkeypatch):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "ponder.hf")
    with pytest.raises(ImportError, match=r"pip install 'ponder\[hf\]'"):
        importlib.import_module("ponder.hf")
