"""The model: plugin norms per position, dials that reach every module, causality."""

from __future__ import annotations

import pytest
import torch

from ponder.config import ModelConfig, PluginSpec
from ponder.errors import ConfigError
from ponder.model import PonderLM, attention_mask


def tiny(**kw) -> PonderLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=30, d_model=16, n_layers=3, n_heads=4, n_local_heads=2, d_ff=32, max_seq_len=24,
               attn_window=4.0)
    return PonderLM(ModelConfig(**{**cfg, **kw.pop("cfg", {})}), **kw)


def test_norm_slots_come_from_the_plugin_with_per_position_settings():
    model = tiny(norm=PluginSpec("rms_norm", {"eps": 1e-5}, {"final": {"eps": 1e-3}}))
    assert type(model.blocks[0].norm_attn).__name__ == "RMSNorm"
    assert model.blocks[2].norm_ffn.eps == 1e-5 and model.norm_final.eps == 1e-3


def test_attention_mask_mixes_global_and_windowed_heads():
    mask = attention_mask(6, n_heads=2, n_local=1, window=2)
    assert mask[0].tolist()[5] == [True] * 6  # global head sees the whole prefix
    assert mask[1].tolist()[5] == [False, False, False, False, True, True]
    assert not mask[:, 2, 3].any()  # causal for both


def test_dials_reach_every_attention_module():
    model = tiny(halting=PluginSpec("fixed"))
    ids = torch.randint(0, 30, (1, 20))
    base = model(ids).logits
    model.dials.set("attn_window", 8)
    wide = model(ids).logits
    assert not torch.allclose(base, wide)
    assert torch.allclose(base[:, :4], wide[:, :4], atol=1e-6)  # the first 4 positions see the same keys
    model.dials.set("attn_window", 4)
    model.dials.set("rope_base", 500.0)
    assert not torch.allclose(base, model(ids).logits)
    model.dials.set("rope_base", 10000.0)
    assert torch.allclose(base, model(ids).logits)


def test_dials_are_floats_rounded_where_used_and_bounded():
    model = tiny()
    window = model.dials["attn_window"]
    for _ in range(20):
        window.set(window.value * 1.005)  # a window that grows slowly must grow
    assert window.value > 4.4 and window.as_int() == 4
    window.set(window.value * 1.2)
    assert window.as_int() == 5
    assert model.dials.set("attn_window", 1000) == 24  # clamped to max_seq_len
    assert 0 < model.dials.set("act_threshold", 0.0) < 1e-300  # (0, 1]: never exactly 0
    with pytest.raises(ConfigError, match=r"act_threshold = 1.5 is outside \(0, 1\]"):
        model(torch.zeros(1, 4, dtype=torch.long), threshold=1.5)
    with pytest.raises(KeyError, match="unknown dial 'nope'"):
        model.dials["nope"]


def test_dials_round_trip_through_state_dict():
    model = tiny()
    model.dials.set("rope_base", 12345.0)
    other = tiny()
    other.dials.load_state_dict(model.dials.state_dict())
    assert other.dials.snapshot() == model.dials.snapshot()


@pytest.mark.parametrize("halting", ["act", "pondernet", "fixed"])
def test_causal_future_tokens_do_not_change_the_past(halting):
    model = tiny(halting=PluginSpec(halting))
    ids = torch.randint(0, 30, (2, 16))
    changed = ids.clone()
    changed[:, -3:] = (changed[:, -3:] + 1) % 30
    a, b = model(ids, threshold=0.5), model(changed, threshold=0.5)
    assert torch.allclose(a.logits[:, :-3], b.logits[:, :-3], atol=1e-5)
    assert torch.equal(a.depth[:, :-3], b.depth[:, :-3])


def test_bad_model_configs_are_named():
    with pytest.raises(ConfigError, match=r"heads of even size"):
        tiny(cfg={"d_model": 12, "n_heads": 4})
    with pytest.raises(ConfigError, match=r"model.attn_window = 100.0 is outside \[1, max_seq_len=24\]"):
        tiny(cfg={"attn_window": 100.0})
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len 24"):
        tiny()(torch.zeros(1, 25, dtype=torch.long))
