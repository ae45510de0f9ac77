"""DyT and ADyT (seeds 000, 001): forward maths, the alpha rule, conversion, training, analysis."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from helpers import run_ponder, write_tiny_config
from torch import nn

import ponder
from ponder import registry
from ponder.config import load_config
from ponder.plugins.norm import AdaptiveDynamicTanh, DynamicTanh, update_adyt_grad_norms
from ponder.train import Trainer


def test_dyt_forward_channels_last_by_hand():
    m = DynamicTanh(2, alpha_init_value=0.5)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([2.0, 3.0]))
        m.bias.copy_(torch.tensor([0.1, -0.1]))
    y = m(torch.tensor([[1.0, -2.0]]))
    assert torch.allclose(y, torch.tensor([[2 * math.tanh(0.5) + 0.1, 3 * math.tanh(-1.0) - 0.1]]))


def test_dyt_forward_channels_first_by_hand():
    m = DynamicTanh(2, channels_last=False, alpha_init_value=1.0, bias=False)
    assert m.bias is None
    with torch.no_grad():
        m.weight.copy_(torch.tensor([2.0, -1.0]))
    x = torch.tensor([0.5, 1.5]).view(1, 2, 1, 1).expand(1, 2, 2, 3)  # NCHW, channel c everywhere = x[c]
    y = m(x)
    assert y.shape == (1, 2, 2, 3)
    assert torch.allclose(y[0, 0], torch.full((2, 3), 2 * math.tanh(0.5)))
    assert torch.allclose(y[0, 1], torch.full((2, 3), -math.tanh(1.5)))


def test_adyt_forward_uses_the_adapted_alpha_in_both_layouts():
    for channels_last, x in ((True, torch.tensor([[0.3, -0.7]])), (False, torch.tensor([[0.3, -0.7]]))):
        m = AdaptiveDynamicTanh(2, channels_last=channels_last, alpha_init_value=0.5, lambda_factor=0.1)
        alpha = 0.5 * (1 + 0.1 / (1e-6 + 1.0))  # G starts at 1.0
        assert m.compute_alpha().item() == pytest.approx(alpha)
        assert torch.allclose(m(x), torch.tanh(alpha * x))


def _set_grads(m, alpha, weight, bias):
    m.alpha.grad = torch.tensor([alpha])
    m.weight.grad = torch.tensor(weight)
    m.bias.grad = torch.tensor(bias)


def test_adyt_alpha_follows_the_formula_over_several_steps():
    m = AdaptiveDynamicTanh(2, alpha_init_value=0.5, lambda_factor=0.1, smooth_factor=0.9, eps=1e-6)
    G = 1.0
    for g_alpha, g_w in [(3.0, [4.0, 0.0]), (0.0, [0.6, 0.8]), (1.0, [2.0, 2.0])]:
        _set_grads(m, g_alpha, g_w, [0.0, 0.0])
        m.update_grad_norm()
        g = math.sqrt(g_alpha ** 2 + sum(v * v for v in g_w))
        G = 0.9 * G + 0.1 * g
        assert float(m.grad_norm) == pytest.approx(G, rel=1e-6)
        assert m.compute_alpha().item() == pytest.approx(min(max(0.5 * (1 + 0.1 / (1e-6 + G)), 0.1), 2.0))


def test_adyt_alpha_is_clipped():
    high = AdaptiveDynamicTanh(2, alpha_init_value=1.0, lambda_factor=10.0)
    assert high.compute_alpha().item() == 2.0
    low = AdaptiveDynamicTanh(2, alpha_init_value=0.01, lambda_factor=0.1)
    assert low.compute_alpha().item() == pytest.approx(0.1)


def test_all_layers_update_in_one_pass_like_one_by_one():
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 4), AdaptiveDynamicTanh(4), nn.Linear(4, 4), AdaptiveDynamicTanh(4),
                             nn.Linear(4, 1))

    a, b = model(), model()
    x = torch.randn(8, 4)
    for m in (a, b):
        m(x).pow(2).sum().backward()
    assert update_adyt_grad_norms(a) == 2
    for layer in (b[1], b[3]):
        layer.update_grad_norm()
    assert torch.allclose(a[1].grad_norm, b[1].grad_norm) and torch.allclose(a[3].grad_norm, b[3].grad_norm)
    assert not torch.allclose(a[1].grad_norm, torch.ones(()))


def test_adyt_state_dict_round_trip_and_eval_uses_frozen_G():
    m = AdaptiveDynamicTanh(3)
    _set_grads(m, 5.0, [0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    m.update_grad_norm()
    state = m.state_dict()
    assert "grad_norm" in state and float(state["grad_norm"]) == pytest.approx(0.99 + 0.05)
    other = AdaptiveDynamicTanh(3)
    other.load_state_dict(state)
    other.eval()
    x = torch.randn(2, 3)
    assert torch.allclose(other(x), torch.tanh(m.compute_alpha() * x))
    assert not torch.allclose(other(x), torch.tanh(0.5 * x))  # not alpha0, as the public reference does


def test_training_adyt_without_the_update_is_warned_about():
    m = AdaptiveDynamicTanh(4)
    with pytest.warns(RuntimeWarning, match="without a gradient-norm update"):
        for _ in range(60):
            m(torch.randn(2, 4))
    m2 = AdaptiveDynamicTanh(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(60):
            m2(torch.randn(2, 4)).sum().backward()
            update_adyt_grad_norms(m2)


# -- conversion --------------------------------------------------------------------------------------

class SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 8, 16), nn.BatchNorm1d(16), nn.Linear(16, 10))

    def forward(self, x):
        h = self.stem(x)
        return self.head(torch.relu(h + self.block(h)))


class SmallViT(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True, norm_first=True) for _ in range(2))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h).mean(1))


@pytest.mark.parametrize(("to", "params"), [("dyt", {"alpha_init_value": 1.0}), ("adyt", {}), ("rmsnorm", {})])
def test_convert_small_resnet_batchnorm(to, params):
    model = SmallResNet().eval()
    x = torch.randn(2, 3, 8, 8)
    before = model(x).shape
    assert ponder.convert(model, to=to, source="batchnorm", **params) == 4
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert model(x).shape == before
    model(x).sum().backward()  # trains


def test_convert_small_vit_layernorm_and_seed_helpers():
    model = SmallViT()
    x = torch.randn(2, 3, 16, 16)
    assert ponder.convert(model, to="DyT", source=("layernorm", "batchnorm")) == 5  # 2 per layer + final
    assert sum(isinstance(m, DynamicTanh) for m in model.modules()) == 5
    # converting keeps the paper's default alpha: the language model's width rule needs its scaled embeddings
    assert {m.alpha.item() for m in model.modules() if isinstance(m, DynamicTanh)} == {0.5}
    assert model(x).shape == (2, 10)
    again = ponder.convert_ln_to_adyt(SmallViT(), lambda_factor=0.5, alpha_max=3.0)
    layers = [m for m in again.modules() if isinstance(m, AdaptiveDynamicTanh)]
    assert len(layers) == 5 and layers[0].lambda_factor == 0.5 and layers[0].alpha_max == 3.0
    assert isinstance(ponder.convert_ln_to_dyt(nn.LayerNorm(4)), DynamicTanh)  # a lone norm is returned replaced


def test_convert_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown source 'groupnorm'; valid sources: layernorm, batchnorm, rmsnorm"):
        ponder.convert(SmallViT(), source="groupnorm")
    with pytest.raises(registry.PluginParameterError, match="'alpha'"):
        ponder.convert(SmallViT(), to="dyt", alpha=1.0)
    with pytest.raises(registry.UnknownPluginError, match="unknown norm 'dyy'"):
        ponder.convert(SmallViT(), to="dyy")


def test_convert_torchvision_models():
    tv = pytest.importorskip("torchvision.models", reason="torchvision does not import beside this torch")
    resnet = tv.resnet50(weights=None).eval()
    assert ponder.convert(resnet, to="dyt", source="batchnorm", alpha_init_value=1.0) == 53
    assert resnet(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    vit = tv.vit_b_16(weights=None).eval()
    assert ponder.convert(vit, to="dyt", source="layernorm") == 25
    assert vit(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


# -- inside the ponder model ---------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["dyt", "adyt"])
def test_new_norms_train_inside_the_ponder_model(tmp_path, norm):
    extra = f'\n[norm]\nname = "{norm}"\n[norm.positions.final]\nalpha_init_value = 0.2\n'
    cfg = write_tiny_config(tmp_path, steps=20)
    cfg.write_text(cfg.read_text() + extra)
    trainer = Trainer(load_config(cfg), tmp_path / "run", progress=False)
    assert trainer.model.norm_final.alpha_init_value == 0.2
    # unset: chosen by width, alpha * std(stream at init) = 1 (width 32: 1 / (0.02 * sqrt(32)))
    # ADyT: alpha0 the same, clipped at the reference's ratios to it (0.1 .. 2.0 around 0.5)
    attn = trainer.model.blocks[0].norm_attn
    assert attn.alpha_init_value == pytest.approx(8.84)
    if norm == "adyt":
        assert (attn.alpha_min, attn.alpha_max) == pytest.approx((8.84 * 0.2, 8.84 * 4))
    assert trainer.model.embed.scale.item() == pytest.approx(32 ** 0.5)  # the DyT LLaMA recipe's embedding scale
    before = trainer.validate()["loss"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # ADyT is updated without the user adding anything
        after = trainer.train()["loss"]
    assert after < before
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    alphas = records[-2]["norms"]["blocks.0.norm_attn"]
    assert set(alphas) >= {"alpha"}
    if norm == "adyt":
        assert trainer.notes and "adyt" in trainer.notes[0]
        assert float(trainer.model.blocks[0].norm_attn.grad_norm) != 1.0
        assert alphas["grad_norm"] != 1.0


def test_analyze_norms_and_alphas_cli(tmp_path):
    cfg = write_tiny_config(tmp_path, steps=6)
    cfg.write_text(cfg.read_text() + '\n[norm]\nname = "dyt"\n')
    Trainer(load_config(cfg), tmp_path / "run", progress=False).train()
    proc = run_ponder("analyze", "norms", str(tmp_path / "run"), "--output-dir", str(tmp_path / "an"))
    report = json.loads((tmp_path / "an" / "norm_curves.json").read_text())
    assert len(report["layers"]) == 7  # 3 layers x (attn, ffn) + final
    first = report["layers"][0]
    assert first["r2_tanh"] > 0.999  # a DyT layer with its affine removed is exactly tanh(alpha x)
    assert first["alpha"] == pytest.approx(8.84, rel=0.05)  # the width-32 default (language_model_alpha)
    assert "blocks.0.norm_attn" in proc.stdout
    assert (tmp_path / "an" / "norm_curves.png").read_bytes()[:4] == b"\x89PNG"
    proc = run_ponder("analyze", "alphas", str(tmp_path / "run"))
    alphas = json.loads((tmp_path / "run" / "alphas.json").read_text())
    assert {a["layer"] for a in alphas["layers"]} >= {"blocks.0.norm_attn", "norm_final"}
    assert alphas["layers"][0]["records"] == 3  # log_every 2, 6 steps
    assert (tmp_path / "run" / "alphas.png").exists()


def test_analyze_alphas_of_a_layernorm_run_is_a_clear_error(tmp_path):
    Trainer(load_config(write_tiny_config(tmp_path, steps=2)), tmp_path / "run", progress=False).train()
    proc = run_ponder("analyze", "alphas", str(tmp_path / "run"), check=False)
    assert proc.returncode == 2 and "has no alpha records: the run's norm is not DyT or ADyT" in proc.stderr


def test_analyze_norms_on_any_python_model(tmp_path):
    from ponder.analyze import analyze_norms

    model = SmallViT()
    x = torch.randn(4, 3, 16, 16)
    report = analyze_norms(model, lambda: model(x), tmp_path)
    assert [layer["layer"] for layer in report["layers"]] == [
        "layers.0.norm1", "layers.0.norm2", "layers.1.norm1", "layers.1.norm2", "norm"]


def test_the_embedding_scale_follows_the_norm_and_old_checkpoints_still_load():
    from ponder.config import ModelConfig, PluginSpec
    from ponder.model import PonderLM

    cfg = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=2, n_local_heads=1, d_ff=64, max_seq_len=16,
                      attn_window=8.0)
    assert PonderLM(cfg, norm=PluginSpec("layernorm")).embed.scale is None  # LayerNorm rescales by itself
    torch.manual_seed(0)
    model = PonderLM(cfg, norm=PluginSpec("dyt")).eval()
    assert model.embed.scale.item() == pytest.approx(32 ** 0.5)
    # a DyT checkpoint written before the scale existed computed embed(x) * 1: it loads and computes the same
    old = {k: v for k, v in model.state_dict().items() if k != "embed.scale"}
    before = model(torch.arange(8)[None]).logits
    fresh = PonderLM(cfg, norm=PluginSpec("dyt")).eval()
    fresh.load_state_dict(old)
    assert fresh.embed.scale.item() == 1.0
    with torch.no_grad():
        model.embed.scale.fill_(1.0)
    assert torch.allclose(fresh(torch.arange(8)[None]).logits, model(torch.arange(8)[None]).logits)
    assert not torch.allclose(before, model(torch.arange(8)[None]).logits)  # the scale does change the answer


def _lm_after(norm: str, steps: int, params: dict | None = None, scale_off: bool = False) -> tuple[float, float]:
    """Validation loss of a small byte LM before and after ``steps`` steps with ``norm`` (everything else fixed)."""
    from ponder.config import parse_config

    run = parse_config({
        "model": dict(d_model=64, n_layers=2, n_heads=2, n_local_heads=1, d_ff=128, max_seq_len=64, attn_window=16.0),
        "norm": {"name": norm, **(params or {})}, "halting": {"name": "act"},
        "optimizer": {"name": "adamw", "lr": 3e-3}, "data": {"source": "embedded", "tokenizer": "byte"},
        "train": dict(steps=steps, batch_size=16, seq_len=64, warmup_steps=10, eval_every=steps, eval_batches=4,
                      checkpoint_every=steps, seed=0)})
    trainer = Trainer(run, None, progress=False)
    if scale_off:  # the model as it was before the recipe: embeddings unscaled
        trainer.model.embed.scale.requires_grad_(False).fill_(1.0)
    return trainer.validate()["loss"], trainer.train()["loss"]


def test_dyt_and_adyt_learn_about_as_fast_as_layernorm(one_thread):
    """Loose, noise-proof: after 160 steps DyT and ADyT have covered most of LayerNorm's drop in loss and are well
    below the byte-frequency plateau where DyT used to stall (measured: LN 5.53 -> 2.27, DyT -> 2.71, ADyT -> 2.61,
    the old DyT (alpha 0.5, no embedding scale) -> 3.24)."""
    from collections import Counter

    from ponder.data import embedded_corpus

    counts = Counter(embedded_corpus().encode("utf-8"))
    total = sum(counts.values())
    byte_entropy = -sum(c / total * math.log(c / total) for c in counts.values())  # the unigram plateau, ~3.2

    def learned(before: float, after: float, ln: tuple[float, float]) -> bool:
        return before - after >= 0.75 * (ln[0] - ln[1]) and after < byte_entropy - 0.3

    ln = _lm_after("layernorm", 160)
    assert ln[1] < byte_entropy - 0.5
    for norm in ("dyt", "adyt"):
        assert learned(*_lm_after(norm, 160), ln), norm
    # the bound tells the recipe apart: DyT as it was (alpha 0.5, unscaled embeddings) fails it
    assert not learned(*_lm_after("dyt", 160, {"alpha_init_value": 0.5}, scale_off=True), ln)


def test_dyt_alpha_learns_at_its_own_rate_in_the_language_model_only(tmp_path):
    from ponder.contracts.norms import parameter_groups
    from ponder.train import build_optimizer

    cfg = write_tiny_config(tmp_path, steps=2)
    cfg.write_text(cfg.read_text() + '\n[norm]\nname = "dyt"\n[norm.positions.final]\nalpha_lr_scale = 3.0\n')
    run = load_config(cfg)
    trainer = Trainer(run, None, progress=False)
    optimizer = build_optimizer(run, trainer.model)
    by_scale = {g.get("lr_scale", 1.0): g for g in optimizer.param_groups}
    assert set(by_scale) == {1.0, 10.0, 3.0}
    assert by_scale[10.0]["lr"] == pytest.approx(10 * by_scale[1.0]["lr"])
    assert {id(p) for p in by_scale[3.0]["params"]} == {id(trainer.model.norm_final.alpha)}
    assert len(by_scale[10.0]["params"]) == 2 * 3  # every block's two alphas; nothing else
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(trainer.model.parameters()))
    # outside the language model (converting a model) alpha learns with the rest, as in the paper
    converted = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    ponder.convert(converted, to="dyt")
    assert len(parameter_groups(converted)) == 1
    with pytest.raises(registry.PluginParameterError, match="alpha_lr_scale must be > 0"):
        registry.create("norm", "dyt", 8, alpha_lr_scale=0.0)
