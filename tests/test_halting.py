"""The halting maths, pinned on hand-computed cases, for each built-in halting plugin."""

from __future__ import annotations

import math

import pytest
import torch

from ponder.config import ModelConfig, PluginSpec
from ponder.model import PonderLM
from ponder.registry import Registry

REG = Registry(autoload=False)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def rule(name: str, n_layers: int, probs: list[float], **params):
    """A rule whose unit gives the same probability ``probs[n]`` to every token after layer n."""
    r = REG.create("halting", name, 2, n_layers, **params)
    if hasattr(r, "weight"):
        with torch.no_grad():
            r.weight.zero_()
            r.bias.copy_(torch.tensor([logit(p) for p in probs]))
    return r


def states(n_layers: int) -> list[torch.Tensor]:
    """Distinct per-layer states [1, 1, 2] so weighted sums can be checked."""
    return [torch.full((1, 1, 2), float(10 ** n)) for n in range(n_layers)]


def run(r, threshold: float, n_layers: int, stop_early: bool = False):
    s = states(n_layers)
    st = r.init_state(torch.zeros(1, 1, 2))
    weights = []
    for n in range(n_layers):
        st = r.step(st, s[n], n, threshold)
        weights.append(st.weight.item())
    return st, weights, s


def test_act_halts_at_threshold_with_remainder():
    r = rule("act", 3, [0.3, 0.5, 0.9])
    st, w, s = run(r, threshold=0.7, n_layers=3)
    assert w == pytest.approx([0.3, 0.7, 0.0])  # halts after layer 2, taking the remainder 1 - 0.3
    assert float(st.depth) == 2 and bool(st.halted)
    assert st.aux.item() == pytest.approx(0.7)  # R
    assert r.ponder_cost(st).item() == pytest.approx(2.7)  # N + R
    assert torch.allclose(st.output, 0.3 * s[0] + 0.7 * s[1])
    assert torch.equal(st.hidden, st.output)  # frozen: layer 3's state did not reach it
    assert st.cum.item() == pytest.approx(1.0)


def test_act_runs_to_the_last_layer_when_the_sum_stays_below_threshold():
    r = rule("act", 3, [0.3, 0.5, 0.9])
    st, w, s = run(r, threshold=0.99, n_layers=3)
    assert w == pytest.approx([0.3, 0.5, 0.2])
    assert sum(w) == pytest.approx(1.0)
    assert float(st.depth) == 3 and st.aux.item() == pytest.approx(0.2)
    assert torch.allclose(st.output, 0.3 * s[0] + 0.5 * s[1] + 0.2 * s[2])


def test_threshold_one_gives_full_depth_even_when_probabilities_sum_past_one():
    r = rule("act", 4, [0.9, 0.9, 0.9, 0.9])
    st, w, _ = run(r, threshold=1.0, n_layers=4)
    assert float(st.depth) == 4
    assert w == pytest.approx([0.9, 0.1, 0.0, 0.0])
    assert sum(w) == pytest.approx(1.0)


def test_act_ponder_cost_has_a_gradient_through_the_remainder():
    r = rule("act", 3, [0.3, 0.5, 0.9], act_lambda=0.5)
    st, _, _ = run(r, threshold=0.7, n_layers=3)
    r.loss(st).backward()
    assert r.bias.grad[0] < 0  # raising the first probability shrinks R, the cost falls
    assert r.loss(st).item() == pytest.approx(0.5 * 2.7)


def test_act_bias_starts_negative_and_is_configurable():
    assert torch.all(REG.create("halting", "act", 8, 4).bias == -3.0)
    assert torch.all(REG.create("halting", "act", 8, 4, bias_init=-1.5).bias == -1.5)


def test_pondernet_geometric_weights_and_deterministic_threshold():
    r = rule("pondernet", 3, [0.5, 0.5, 0.5], lambda_p=0.5, beta=1.0)
    st, w, s = run(r, threshold=0.99, n_layers=3)
    assert w == pytest.approx([0.5, 0.25, 0.25])  # p_n = lambda_n prod(1 - lambda_j), lambda_N = 1
    assert torch.allclose(st.output, s[2])  # the state at the halting layer, not a mixture
    prior = torch.tensor([0.5, 0.25, 0.125]) / 0.875
    kl = sum(p * math.log(p / float(q)) for p, q in zip([0.5, 0.25, 0.25], prior, strict=True))
    assert st.aux.item() == pytest.approx(kl, rel=1e-5)
    assert r.loss(st).item() == pytest.approx(kl, rel=1e-5)

    st, w, s = run(r, threshold=0.7, n_layers=3)
    assert w == pytest.approx([0.5, 0.5, 0.0])  # 0.5 + 0.25 >= 0.7: halt at 2 with the remainder
    assert float(st.depth) == 2 and torch.allclose(st.output, s[1])


def test_fixed_runs_every_layer_and_costs_nothing():
    r = REG.create("halting", "fixed", 2, 3)
    st, w, s = run(r, threshold=0.1, n_layers=3)
    assert w == [0.0, 0.0, 1.0] and float(st.depth) == 3
    assert torch.equal(st.output, s[2])
    assert r.loss(st).item() == 0.0
    assert list(r.parameters()) == []


@pytest.mark.parametrize("halting", ["act", "pondernet", "fixed"])
def test_weights_sum_to_one_per_token(halting):
    torch.manual_seed(0)
    model = PonderLM(ModelConfig(vocab_size=50, d_model=16, n_layers=4, n_heads=2, n_local_heads=1, d_ff=32,
                                 max_seq_len=16, attn_window=4), halting=PluginSpec(halting, {}))
    ids = torch.randint(0, 50, (3, 16))
    h = model.halting
    if hasattr(h, "weight"):
        torch.nn.init.normal_(h.weight, std=1.0)  # spread the probabilities out
    x = model.embed(ids)
    st = h.init_state(x)
    total = torch.zeros(3, 16)
    for n in range(4):
        st = h.step(st, x * (n + 1), n, 0.9)
        total += st.weight
    assert torch.allclose(total, torch.ones(3, 16), atol=1e-6)
    assert bool(st.halted.all())


def _tiny(halting: str, **params) -> PonderLM:
    torch.manual_seed(0)
    return PonderLM(ModelConfig(vocab_size=40, d_model=16, n_layers=4, n_heads=2, n_local_heads=1, d_ff=32,
                                max_seq_len=12, attn_window=4), halting=PluginSpec(halting, params))


def test_layers_are_counted_as_layers_not_halting_weights():
    model = _tiny("act")
    ids = torch.randint(0, 40, (2, 12))
    full = model(ids, threshold=1.0)
    assert full.layers_executed == 4 and torch.all(full.depth == 4)  # a sum of halting weights would be <= 1
    with torch.no_grad():
        model.halting.bias.fill_(4.0)  # h ~ 0.98 after every layer
    out = model(ids, threshold=0.5)
    assert out.layers_executed == 1 and torch.all(out.depth == 1)
    mixed = model(ids, threshold=0.99)  # 0.98 < 0.99: every token needs a second layer
    assert mixed.layers_executed == int(mixed.depth.max()) == 2


def test_the_loop_stops_once_every_token_has_halted():
    model = _tiny("act", bias_init=4.0)
    calls = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
    out = model(torch.randint(0, 40, (2, 12)), threshold=0.5)
    assert calls == [0] and out.layers_executed == 1


@pytest.mark.parametrize("halting", ["act", "pondernet", "fixed"])
def test_training_loss_has_gradients_for_the_halting_unit(halting):
    model = _tiny(halting)
    ids = torch.randint(0, 40, (2, 12))
    out = model(ids, ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    if halting != "fixed":
        assert model.halting.bias.grad is not None and torch.any(model.halting.bias.grad != 0)
    if halting == "pondernet":
        assert not torch.allclose(out.task_loss, out.ce)  # the expected loss over halting layers
