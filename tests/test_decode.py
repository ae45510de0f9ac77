"""Decoding through the KV cache (ponder.decode) against re-running the whole window, and sampling
(ponder.generation)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ponder.config import ModelConfig, PluginSpec
from ponder.decode import decode_step, generate_ids
from ponder.errors import ConfigError
from ponder.generation import SamplingParams, Step, StopText, generate, sample
from ponder.model import PonderLM

NORMS = ("layernorm", "rmsnorm", "dyt", "adyt")
HALTING = ("act", "pondernet", "fixed")
THRESHOLDS = (0.5, 0.9, 0.99, 1.0)


def tiny(norm: str = "layernorm", halting: str = "act", seed: int = 0, **overrides) -> PonderLM:
    """A small model whose tokens halt at different depths: the halting units get random weights (at their
    initial bias every token would run every layer), and local heads with a short window."""
    torch.manual_seed(seed)
    settings = dict(vocab_size=256, d_model=32, n_layers=4, n_heads=4, n_local_heads=2, d_ff=64, max_seq_len=24,
                    attn_window=5, rope_base=500.0)
    cfg = ModelConfig(**{**settings, **overrides})
    model = PonderLM(cfg, norm=PluginSpec(norm), halting=PluginSpec(halting)).eval()
    if hasattr(model.halting, "bias"):
        with torch.no_grad():
            model.halting.bias.normal_(0.0, 1.5)
            model.halting.weight.normal_(0.0, 0.5)
    return model


def _teacher_forced(model: PonderLM, ids: torch.Tensor, prefill: int, threshold: float):
    """Prefill ``prefill`` tokens, then one token per step; returns per step (logits, depth, layers) of the new
    positions."""
    out = decode_step(model, ids[:, :prefill], None, threshold=threshold)
    steps = [(out.logits, out.depth, out.layers_executed, 0)]
    past = out.present
    for i in range(prefill, ids.shape[1]):
        out = decode_step(model, ids[:, i:i + 1], past, threshold=threshold)
        past = out.present
        steps.append((out.logits, out.depth, out.layers_executed, i))
    return steps


@pytest.mark.parametrize("norm,halting", list(itertools.product(NORMS, HALTING)))
def test_the_cache_gives_the_full_forward_of_every_prefix(norm, halting):
    model = tiny(norm, halting)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, model.cfg.max_seq_len), generator=gen)
    depths = set()
    for threshold in THRESHOLDS:
        for logits, depth, layers, end in _teacher_forced(model, ids, 5, threshold):
            t = logits.shape[1]
            with torch.no_grad():
                full = model(ids[:, : (end + 1) if end else 5], threshold=threshold)
            assert torch.allclose(logits, full.logits[:, -t:], atol=1e-4, rtol=0), (threshold, end)
            assert torch.equal(depth, full.depth[:, -t:].to(torch.int64)), (threshold, end)
            assert layers == int(depth.max())  # a full step ran exactly as deep as the deepest new token
            depths.update(depth.flatten().tolist())
    if halting != "fixed":
        assert len(depths) > 1  # tokens really halted at different depths, so the fills were exercised


def test_a_halted_token_fills_the_later_layers_from_its_frozen_state():
    model = tiny("layernorm", "act")
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    out = decode_step(model, ids[:, :8], None, threshold=0.5)
    step = decode_step(model, ids[:, 8:9], out.present, threshold=0.5)
    assert step.layers_executed < model.cfg.n_layers  # the new token halted early ...
    assert all(kv.key.shape[2] == 9 for kv in step.present)  # ... and every layer still holds its keys


def test_rows_of_different_lengths_share_a_step_through_the_attention_mask():
    model = tiny("rmsnorm", "act")
    gen = torch.Generator().manual_seed(2)
    long, short = torch.randint(0, 256, (1, 9), generator=gen), torch.randint(0, 256, (1, 6), generator=gen)
    padded = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.int64), short], 1)])
    mask = torch.ones(2, 9, dtype=torch.int64)
    mask[1, :3] = 0  # left padding
    both = decode_step(model, padded, None, mask, threshold=0.9)
    alone = [decode_step(model, long, None, threshold=0.9), decode_step(model, short, None, threshold=0.9)]
    assert torch.allclose(both.logits[0], alone[0].logits[0], atol=1e-4)
    assert torch.allclose(both.logits[1, 3:], alone[1].logits[0], atol=1e-4)
    nxt = torch.tensor([[7], [9]])
    step = decode_step(model, nxt, both.present, torch.cat([mask, torch.ones(2, 1, dtype=torch.int64)], 1), 0.9)
    ref = decode_step(model, nxt[1:], alone[1].present, threshold=0.9)
    assert torch.allclose(step.logits[1], ref.logits[0], atol=1e-4)


@pytest.mark.parametrize("halting", HALTING)
def test_left_padding_starts_halted_and_each_row_keeps_its_own_threshold(halting):
    """A prefill of prompts of different lengths, left-padded, each row at its own threshold (a tensor): every row
    is what it is alone (logits, depths, its deepest token's depth as its layer count); padding has depth 0."""
    model = tiny("layernorm", halting)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 256, (1, n), generator=gen) for n in (10, 4, 7)]
    thresholds = [0.9, 0.05, 0.5]
    ids = torch.cat([torch.cat([torch.zeros(1, 10 - p.shape[1], dtype=torch.int64), p], 1) for p in prompts])
    mask = torch.stack([torch.arange(10) >= 10 - p.shape[1] for p in prompts]).to(torch.int64)
    both = decode_step(model, ids, None, mask, threshold=torch.tensor(thresholds))
    alone = [decode_step(model, p, None, threshold=t) for p, t in zip(prompts, thresholds, strict=True)]
    for r, (p, out) in enumerate(zip(prompts, alone, strict=True)):
        n = p.shape[1]
        assert torch.allclose(both.logits[r, -n:], out.logits[0], atol=1e-5), r
        assert torch.equal(both.depth[r, -n:], out.depth[0]) and not both.depth[r, :-n].any(), r
        assert int(both.depth[r].max()) == out.layers_executed, r
    assert both.layers_executed == max(out.layers_executed for out in alone)
    if halting != "fixed":
        assert len({out.layers_executed for out in alone}) > 1
    nxt = torch.tensor([[7], [9], [11]])
    step = decode_step(model, nxt, both.present, torch.cat([mask, torch.ones(3, 1, dtype=torch.int64)], 1),
                       threshold=torch.tensor(thresholds))
    for r, (out, t) in enumerate(zip(alone, thresholds, strict=True)):
        ref = decode_step(model, nxt[r:r + 1], out.present, threshold=t)
        assert torch.allclose(step.logits[r], ref.logits[0], atol=1e-5) and torch.equal(step.depth[r], ref.depth[0])


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_generation_past_the_context_prefills_the_last_half_again(threshold):
    model = tiny("layernorm", "act", seed=4)
    prompt = list(range(40, 46))
    context = list(prompt)
    tokens = list(generate_ids(model, prompt, SamplingParams(max_tokens=40), threshold=threshold))
    assert [t.final for t in tokens] == [False] * 39 + [True] and tokens[-1].finish_reason == "length"
    prefills = [t.index for t in tokens if t.prefill]
    assert prefills[0] == 0 and len(prefills) >= 3  # 6 + 40 tokens through a context of 24: re-prefilled
    for token in tokens:
        assert token.context <= model.cfg.max_seq_len
        with torch.no_grad():
            full = model(torch.tensor([context[-token.context:]]), threshold=threshold)
        assert token.token_id == int(full.logits[0, -1].argmax())
        assert token.depth == int(full.depth[0, -1])
        context.append(token.token_id)


def test_a_prefill_compacts_as_the_scoring_forward_does_and_computes_the_same(monkeypatch):
    import ponder.decode as decode

    model = tiny("dyt", "pondernet", seed=7)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(7))
    ran = []
    real = decode.compacted_cached_layer
    monkeypatch.setattr(decode, "compacted_cached_layer", lambda *a, **k: ran.append(a[3]) or real(*a, **k))
    compacted = decode_step(model, ids, threshold=0.5, compaction_cutoff=1.0)  # wherever a token has halted
    assert ran  # the running tokens only, in some layer
    model.compaction = "off"
    dense = decode_step(model, ids, threshold=0.5)
    assert torch.allclose(compacted.logits, dense.logits, atol=1e-4)
    assert torch.equal(compacted.depth, dense.depth) and compacted.layers_executed == dense.layers_executed
    for a, b in zip(compacted.present, dense.present, strict=True):  # the cache holds every new token either way
        assert torch.allclose(a.key, b.key, atol=1e-5) and torch.allclose(a.value, b.value, atol=1e-5)


def test_a_prompt_longer_than_the_context_is_refused():
    model = tiny()
    with pytest.raises(ConfigError, match="max_seq_len 24"):
        decode_step(model, torch.zeros(1, 25, dtype=torch.int64))


# -- sampling ----------------------------------------------------------------------------------------------------

def test_greedy_is_the_argmax_and_top_k_1_is_greedy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=300).astype(np.float32)
    assert sample(logits, SamplingParams(), rng) == int(logits.argmax())
    assert all(sample(logits, SamplingParams(temperature=5.0, top_k=1), rng) == int(logits.argmax())
               for _ in range(20))


def test_the_same_seed_gives_the_same_text_and_another_seed_another():
    model = tiny(seed=5)

    def text(seed):
        params = SamplingParams(temperature=1.5, top_p=0.95, seed=seed, max_tokens=12)
        return [t.token_id for t in generate_ids(model, [1, 2, 3], params)]

    assert text(7) == text(7)
    assert len({tuple(text(s)) for s in range(4)}) > 1


def test_a_tiny_temperature_is_the_argmax_not_nan():
    rng = np.random.default_rng(2)
    logits = np.array([1.0, 3.0, 2.0, 3.0 - 1e-6], dtype=np.float32)
    assert {sample(logits, SamplingParams(temperature=1e-300), rng) for _ in range(20)} == {1}


def test_top_k_and_top_p_keep_only_the_head_of_the_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(1)
    drawn = {sample(logits, SamplingParams(temperature=1.0, top_k=2), rng) for _ in range(200)}
    assert drawn == {0, 1}
    drawn = {sample(logits, SamplingParams(temperature=1.0, top_p=0.75), rng) for _ in range(200)}
    assert drawn == {0, 1}  # 0.5 + 0.3 reaches 0.75
    drawn = {sample(logits, SamplingParams(temperature=1.0), rng) for _ in range(2000)}
    assert drawn == {0, 1, 2, 3}


def test_stop_strings_end_the_text_before_them_and_hold_back_a_partial_match():
    stop = StopText(["END"])
    assert stop.add(b"ab") == b"ab"
    assert stop.add(b"abE") == b""  # could be the start of END
    assert stop.add(b"abEN") == b""
    assert stop.add(b"abENx") == b"ENx"  # it was not
    assert stop.add(b"abENxEND") == b"" and stop.stopped
    assert stop.flush() == b""


def test_generation_stops_at_a_stop_string_which_is_not_output():
    script = b"say hello END and more"

    def step(new_ids, past):  # a model that writes the script, one byte per step
        done = 0 if past is None else past
        logits = np.zeros(256, dtype=np.float32)
        logits[script[done]] = 1.0
        return Step(logits, done + 1, 1, 1, 0.0)

    tokens = list(generate(step, [1], SamplingParams(max_tokens=30, stop=("END", "xyz")), 64, bytes))
    assert tokens[-1].final and tokens[-1].finish_reason == "stop"
    assert b"".join(t.text for t in tokens) == b"say hello "
    assert len(tokens) == len(b"say hello END")  # it stopped as soon as the stop string was complete
    tokens = list(generate(step, [1], SamplingParams(max_tokens=12, stop=("ENDING",)), 64, bytes))
    assert tokens[-1].finish_reason == "length" and b"".join(t.text for t in tokens) == script[:12]


@pytest.mark.parametrize("data,message", [
    ({"max_tokens": 0}, "max_tokens = 0 is outside"),
    ({"max_tokens": -3}, "max_tokens = -3"),
    ({"max_tokens": 5000}, "outside \\[1, 1024\\]"),
    ({"temperature": -1}, "temperature = -1.0 must be"),
    ({"temperature": "nan"}, "temperature = nan"),
    ({"top_p": 0}, "top_p = 0.0 is outside \\(0, 1\\]"),
    ({"top_p": 1.5}, "top_p = 1.5"),
    ({"top_k": -1}, "top_k = -1"),
    ({"beam_width": 2}, "unknown key\\(s\\) 'beam_width'"),
    ("[1, 2]", "must be a JSON object"),
    ("{not json", "not valid JSON"),
    ({"max_tokens": "many"}, "max_tokens = 'many' is not an integer"),
    ({"temperature": None}, "temperature = None is not a number"),
    ({"top_p": [0.5]}, "top_p = \\[0.5\\] is not a number"),
    ({"top_k": {"k": 1}}, "top_k = \\{'k': 1\\} is not an integer"),
    ({"stop": [1, 2]}, "stop = \\[1, 2\\] must be non-empty strings"),
])
def test_bad_sampling_parameters_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        SamplingParams.from_json(data if isinstance(data, str) else __import__("json").dumps(data))


def test_sampling_parameters_accept_numbers_as_strings_as_llm_clients_send_them():
    params = SamplingParams.from_json('{"temperature": "0.1", "top_p": "0.95", "max_tokens": "8", "stop": "\\n"}')
    assert params == SamplingParams(temperature=0.1, top_p=0.95, max_tokens=8, stop=("\n",))
