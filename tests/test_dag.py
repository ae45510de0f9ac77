"""DAG, the Dynamic-Alpha Gradient optimizer: its maths by hand, its two code paths, validation, exact resume,
and that it optimises (a badly conditioned quadratic, a tiny ponder model)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from statistics import NormalDist

import pytest
import torch
from helpers import write_tiny_config
from safetensors.torch import load_file, save_file

from ponder import registry
from ponder.checkpoint import from_tree, to_tree
from ponder.config import load_config
from ponder.plugins.optim import DAG, cosine_k_schedule
from ponder.train import Trainer


def _params(*shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in shapes]


# -- the maths, by hand -------------------------------------------------------------------------------

def test_two_steps_by_hand_with_momentum_weight_decay_and_an_active_shrink():
    """One tensor, so (d / d_total)**beta = 1; warmup_steps=0 and lambda_rms=2 make s_t = 0.4 at step 2."""
    x0 = torch.tensor([[0.5, -1.0, 2.0], [0.0, 1.5, -0.5]])
    g1 = torch.tensor([[3.0, -0.5, 0.2], [0.1, -0.3, 0.4]])
    g2 = torch.tensor([[-1.0, 0.8, 0.6], [0.7, -0.2, 2.5]])
    lr, mom, damp, wd, k = 0.1, 0.9, 0.1, 0.05, 1.5
    tau, p_star, eta, rho, eps = 1.0, 0.2, 0.5, 0.3, 1e-5
    lam, s_min, gamma, ema = 2.0, 0.2, 2.0, 0.5
    (x,) = params = [torch.nn.Parameter(x0.clone())]
    opt = DAG(params, lr=lr, momentum=mom, dampening=damp, weight_decay=wd, k_val=k, sat_every=1,
              hyper=dict(tau=tau, p_star=p_star, eta=eta, rho=rho, eps=eps, beta=0.7),
              shrink=dict(warmup_steps=0, gamma=gamma, ema_beta=ema), lambda_rms=lam, s_min=s_min)
    kappa = tau / NormalDist().inv_cdf(1 - p_star / 2)
    d = 6

    # step 1 (t = 0): s = 1, alpha = 1, S = p_star
    n1 = math.sqrt(float((g1 ** 2).sum()))
    sigma1 = n1 / math.sqrt(d)
    alpha_hat1 = kappa * (n1 + eps) / (sigma1 + eps) * 1.0 * (p_star / (p_star + eps)) ** eta * 1.0
    alpha1 = (1 - rho) * 1.0 + rho * alpha_hat1
    z1 = alpha1 / 1.0 * g1 / (n1 + eps)
    sat1 = float((z1.abs() > tau).float().mean())
    assert 0 < sat1 < 1
    u1 = k * 1.0 * torch.tanh(z1) + wd * x0
    buf1 = mom * 0.0 + (1 - damp) * u1
    x1 = x0 - lr * buf1
    r1 = math.sqrt(float((buf1 ** 2).sum()) / d)
    rms0 = r1
    s1 = s_min + (1 - s_min) * min(max(r1 / (lam * rms0), 0.0), 1.0) ** gamma
    assert s1 == pytest.approx(0.4)

    x.grad = g1.clone()
    opt.step()
    torch.testing.assert_close(x.detach(), x1, atol=1e-6, rtol=0)
    assert float(opt.state[x]["alpha"]) == pytest.approx(alpha1, rel=1e-6)
    assert float(opt.state[x]["saturation"]) == pytest.approx(sat1)
    assert opt.s_t == pytest.approx(s1, rel=1e-6)

    # step 2 (t = 1): the shrink from step 1 scales the target, z and the update
    n2 = math.sqrt(float((g2 ** 2).sum()))
    sigma2 = n2 / math.sqrt(d)
    alpha_hat2 = kappa * (n2 + eps) / (sigma2 + eps) * 1.0 * (p_star / (sat1 + eps)) ** eta * s1
    alpha2 = (1 - rho) * alpha1 + rho * alpha_hat2
    z2 = alpha2 / s1 * g2 / (n2 + eps)
    sat2 = float((z2.abs() > tau).float().mean())
    u2 = k * s1 * torch.tanh(z2) + wd * x1
    buf2 = mom * buf1 + (1 - damp) * u2
    x2 = x1 - lr * buf2
    rms2 = math.sqrt(float((buf2 ** 2).sum()) / d)
    r2 = ema * r1 + (1 - ema) * rms2
    s2 = s_min + (1 - s_min) * min(max(r2 / (lam * rms0), 0.0), 1.0) ** gamma

    x.grad = g2.clone()
    opt.step()
    torch.testing.assert_close(x.detach(), x2, atol=1e-6, rtol=0)
    assert float(opt.state[x]["alpha"]) == pytest.approx(alpha2, rel=1e-6)
    assert float(opt.state[x]["saturation"]) == pytest.approx(sat2)
    torch.testing.assert_close(opt.state[x]["momentum_buffer"], buf2, atol=1e-6, rtol=0)
    assert opt.s_t == pytest.approx(s2, rel=1e-6)


@pytest.mark.parametrize("foreach", [True, False])
def test_dimension_factor_warmup_baseline_and_global_rms_by_hand(foreach):
    """Two tensors: (d / d_total)**beta per tensor; warmup_steps=1 locks s_t at 1 for one step, then the shrink
    follows the EMA of the RMS over all tensors (read here from the parameters' own moves)."""
    a, b = params = _params((4, 5), (3,))
    lr, beta, tau, p_star, eta, eps = 0.5, 0.5, 1.25, 0.1, 0.3, 1e-5
    lam, s_min, ema = 4.0, 0.1, 0.5
    opt = DAG(params, lr=lr, foreach=foreach, hyper=dict(beta=beta), lambda_rms=lam, s_min=s_min,
              shrink=dict(warmup_steps=1, ema_beta=ema))
    kappa = tau / NormalDist().inv_cdf(1 - p_star / 2)
    assert kappa == pytest.approx(0.760, abs=5e-4)
    gen = torch.Generator().manual_seed(5)
    rms = []
    for step in range(2):  # s_t is 1 at both steps: step 0 is the warm-up, whose s_t step 1 uses
        before = [p.detach().clone() for p in params]
        expected = []
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
            d, norm = p.numel(), float(p.grad.norm())
            sat = p_star if step == 0 else float(opt.state[p]["saturation"])  # measured at step 0 (sat_every=10)
            alpha = 1.0 if step == 0 else float(opt.state[p]["alpha"])
            alpha_hat = (kappa * (norm + eps) / (norm / math.sqrt(d) + eps) * (d / 23) ** beta
                         * (p_star / (sat + eps)) ** eta)
            expected.append(0.9 * alpha + 0.1 * alpha_hat)
        opt.step()
        for p, alpha in zip(params, expected, strict=True):
            assert float(opt.state[p]["alpha"]) == pytest.approx(alpha, rel=1e-6)
        moves = sum(float(((p0 - p.detach()) ** 2).sum()) for p0, p in zip(before, params, strict=True))
        rms.append(math.sqrt(moves / 23) / lr)
    r1 = rms[0]
    r2 = ema * r1 + (1 - ema) * rms[1]
    s2 = s_min + (1 - s_min) * min(r2 / (lam * r1), 1.0)
    assert s2 < 1.0  # the shrink is active after step 2
    assert opt.s_t == pytest.approx(s2, rel=1e-5)


def test_default_kappa_and_seed_defaults():
    opt = DAG(_params(3))
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["k_val"], group["tau"], group["p_star"], group["kappa"]) == (
        1e-3, 0.0, 2.0, 1.25, 0.10, None)
    assert (group["beta"], group["eta"], group["rho"], group["eps"]) == (1 / 3, 0.3, 0.1, 1e-5)
    assert (group["alpha_min"], group["alpha_max"]) == (1e-12, 1e12)
    assert opt.shrink == {"lambda_rms": 0.3, "s_min": 0.1, "gamma": 1.0, "ema_beta": 0.98, "warmup_steps": 500}
    assert (opt.use_exact_sigma, opt.sigma_every, opt.sat_every) == (False, 1, 10)
    assert opt.s_t == 1.0 and opt.k_val == 2.0


# -- two code paths, one result -------------------------------------------------------------------------

CONFIGS = [
    {},
    {"weight_decay": 0.1, "k_val": 1.3},
    {"momentum": 0.9, "weight_decay": 0.05, "nesterov": True, "sat_every": 3},
    {"momentum": 0.5, "dampening": 0.3, "maximize": True, "use_exact_sigma": True, "sigma_every": 2},
    {"momentum": 0.9, "shrink": {"warmup_steps": 3, "ema_beta": 0.5, "gamma": 2.0}, "lambda_rms": 3.0},
]


def _trajectory(foreach, config, steps=10):
    params = _params((5, 7), (3,), (4, 2, 2), (1,), (16, 16), seed=1)
    opt = DAG(params, lr=0.05, foreach=foreach, **config)
    gen = torch.Generator().manual_seed(2)
    for step in range(steps):
        for i, p in enumerate(params):
            if not (i == 1 and step % 3 == 1):  # sometimes a tensor has no gradient: it is skipped
                p.grad = torch.randn(p.shape, generator=gen) * (1 + i)
            else:
                p.grad = None
        opt.step()
    return params, opt


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(c) or "defaults")
def test_foreach_and_loop_paths_agree(config):
    fast, fast_opt = _trajectory(True, config)
    slow, slow_opt = _trajectory(False, config)
    for p, q in zip(fast, slow, strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
        for key in ("alpha", "saturation"):
            torch.testing.assert_close(fast_opt.state[p][key], slow_opt.state[q][key], atol=1e-6, rtol=1e-5)
    assert fast_opt.s_t == pytest.approx(slow_opt.s_t, rel=1e-6)
    if "shrink" in config:
        assert fast_opt.s_t < 1.0


def test_parameters_without_gradient_are_skipped():
    a, b = params = _params(4, 4)
    opt = DAG(params, lr=0.1)
    a.grad = torch.ones(4)
    before = b.detach().clone()
    opt.step()
    assert torch.equal(b.detach(), before) and "alpha" not in opt.state[b]
    b.grad = None
    a.grad = None
    opt.step()  # nothing to do: no step is counted
    assert opt.steps_done == 1


# -- behaviour -----------------------------------------------------------------------------------------

def test_maximize_ascends_and_equals_descent_on_the_negated_function():
    target = torch.tensor([3.0, -2.0, 0.5])

    def f(x):
        return -((x - target) ** 2).sum()

    x, y = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    up = DAG([x], lr=0.05, maximize=True, momentum=0.5, weight_decay=0.01)
    down = DAG([y], lr=0.05, momentum=0.5, weight_decay=0.01)
    start = f(x).item()
    for _ in range(60):
        for p, opt, sign in ((x, up, 1.0), (y, down, -1.0)):
            opt.zero_grad()
            (sign * f(p)).backward()
            opt.step()
    assert f(x).item() > start + 10
    assert torch.equal(x.detach(), y.detach())


def test_minimises_a_badly_conditioned_quadratic():
    h = torch.logspace(0, 3, 100)  # condition number 1e3
    x = torch.nn.Parameter(torch.ones(100))
    opt = DAG([x], lr=0.01, shrink=dict(warmup_steps=50))
    first = None
    for _ in range(300):
        opt.zero_grad()
        loss = 0.5 * (h * x * x).sum()
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
    assert (0.5 * (h * x * x).sum()).item() < first / 100


def test_k_sched_is_called_with_the_step_and_bounds_the_update():
    calls = []

    def sched(step):
        return 0.5 + step

    def recorded(step):
        calls.append(step)
        return sched(step)

    (x,) = params = _params(50)
    opt = DAG(params, lr=1.0, k_sched=recorded, hyper=dict(rho=1.0))
    for _ in range(4):
        before = x.detach().clone()
        x.grad = torch.randn(50) * 100
        opt.step()
        assert float((before - x.detach()).abs().max()) <= sched(calls[-1]) + 1e-6  # |u| <= k * s_t
    assert calls == [0, 1, 2, 3]
    assert opt.k_val == 3.5 and opt.metrics()["k"] == 3.5


def test_cosine_k_schedule():
    k = cosine_k_schedule(2.0, 0.5, 100)
    assert k(0) == 2.0 and k(100) == 0.5 and k(1000) == 0.5
    assert k(50) == pytest.approx(1.25)
    assert all(k(i) >= k(i + 1) for i in range(100))
    with pytest.raises(ValueError, match="total_steps"):
        cosine_k_schedule(2.0, 0.5, 0)


def test_dials_and_metrics_are_plain_floats():
    params = _params((3, 3), 5)
    opt = DAG(params, lr=0.1)
    assert opt.metrics() == {"s_t": 1.0, "k": 2.0, "alpha_mean": 1.0, "alpha_min": 1.0, "alpha_max": 1.0,
                             "saturation_mean": 0.1}
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    metrics = opt.metrics()
    assert set(metrics) >= {"s_t", "k", "alpha_mean", "alpha_min", "alpha_max"}
    assert all(type(v) is float for v in metrics.values())
    json.dumps(metrics)
    alphas = [float(opt.state[p]["alpha"]) for p in params]
    assert metrics["alpha_min"] == pytest.approx(min(alphas)) and metrics["alpha_max"] == pytest.approx(max(alphas))
    opt.k_val = 1.0
    assert opt.k_val == 1.0 and all(g["k_val"] == 1.0 for g in opt.param_groups)


# -- validation ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"lr": -1.0}, r"lr must be in \[0, inf\), got -1.0"),
    ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
    ({"dampening": 1.5}, r"dampening must be in \[0, 1\]"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"k_val": 0}, r"k_val must be in \(0, inf\)"),
    ({"hyper": {"p_star": 1.0}}, r"hyper\['p_star'\] must be in \(0, 1\)"),
    ({"hyper": {"rho": 0}}, r"hyper\['rho'\] must be in \(0, 1\]"),
    ({"hyper": {"tau": "big"}}, r"hyper\['tau'\] must be a number"),
    ({"hyper": {"taux": 1.0}}, "unknown hyper key 'taux'; valid keys: tau, p_star, kappa, beta, eta, rho, eps"),
    ({"hyper": {"alpha_min": 2.0, "alpha_max": 1.0}}, r"hyper\['alpha_min'\] must be <= hyper\['alpha_max'\]"),
    ({"shrink": {"s_min": 0.0}}, r"shrink\['s_min'\] must be in \(0, 1\]"),
    ({"s_min": 1.5}, r"shrink\['s_min'\] must be in \(0, 1\]"),
    ({"lambda_rms": -1}, r"shrink\['lambda_rms'\] must be in \(0, inf\)"),
    ({"shrink": {"warmup_steps": 2.5}}, r"shrink\['warmup_steps'\] must be an integer"),
    ({"shrink": {"ema": 0.9}}, "unknown shrink key 'ema'; valid keys: lambda_rms, s_min, gamma, ema_beta"),
    ({"shrink": {"s_min": 0.2}, "s_min": 0.3}, "s_min given twice"),
    ({"nesterov": True}, "nesterov=True needs momentum"),
    ({"sat_every": 0}, r"sat_every must be in \[1, inf\)"),
    ({"sigma_every": 0}, "sigma_every"),
    ({"fused": True}, "fused=True is not implemented"),
    ({"differentiable": True}, "differentiable=True is not implemented"),
    ({"k_sched": 3.0}, "k_sched must be a callable"),
    ({"maximize": "yes"}, "maximize must be True or False"),
])
def test_invalid_settings_name_the_key_and_the_valid_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DAG(_params(3), **kwargs)


def test_quick_start_keywords_and_groups():
    opt = DAG(_params(3), lr=3e-4, weight_decay=1e-2, momentum=0.9, k_val=1.5, lambda_rms=0.25, s_min=0.2,
              hyper=dict(tau=1.5, p_star=0.10, beta=1 / 3, eta=0.3, rho=0.1),
              shrink=dict(ema_beta=0.98, warmup_steps=500, gamma=1.0))
    assert opt.shrink["lambda_rms"] == 0.25 and opt.shrink["s_min"] == 0.2 and opt.shrink["warmup_steps"] == 500
    assert opt.param_groups[0]["tau"] == 1.5
    a, b = _params(3, 4)
    grouped = DAG([{"params": [a]}, {"params": [b], "lr": 0.5, "hyper": {"tau": 2.0}}], lr=0.1)
    assert grouped.param_groups[1]["tau"] == 2.0 and grouped.param_groups[1]["lr"] == 0.5
    assert grouped.param_groups[0]["tau"] == 1.25
    with pytest.raises(ValueError, match=r"hyper\['tau'\] \(parameter group 2\)"):
        grouped.add_param_group({"params": _params(2), "tau": -1.0})
    assert len(grouped.param_groups) == 2


def test_registry_builds_it_from_config_settings():
    params = _params(4)
    opt = registry.create("optimizer", "dag", params, lr=0.01, hyper={"tau": 1.5}, shrink={"warmup_steps": 10})
    assert isinstance(opt, DAG) and opt.param_groups[0]["tau"] == 1.5 and opt.shrink["warmup_steps"] == 10
    docs = {p.name: p.doc for p in registry.describe("optimizer", "dag").params}
    assert "p_star" in docs["hyper"] and "warmup_steps" in docs["shrink"]


def test_listing_optimizers_does_not_import_torch():
    code = ("import sys, ponder.plugins.optim as m; assert 'torch' not in sys.modules; "
            "m.DAG; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- checkpoints ---------------------------------------------------------------------------------------

def _run(params, opt, steps, start=0):
    for step in range(start, start + steps):
        opt.zero_grad()
        gen = torch.Generator().manual_seed(100 + step)
        loss = sum(((p - torch.randn(p.shape, generator=gen)) ** 2 * (1 + i)).sum() for i, p in enumerate(params))
        loss.backward()
        opt.step()


def _resume_setup(foreach):
    params = _params((6, 4), (5,), 1, seed=3)
    opt = DAG(params, lr=0.05, momentum=0.9, weight_decay=0.01, foreach=foreach, sat_every=2, lambda_rms=5.0,
              k_sched=cosine_k_schedule(2.0, 1.0, 6), shrink=dict(warmup_steps=2, ema_beta=0.5))
    return params, opt


@pytest.mark.parametrize("foreach", [True, False])
def test_resume_from_state_dict_is_exact(foreach, tmp_path):
    straight, straight_opt = _resume_setup(foreach)
    _run(straight, straight_opt, 6)
    assert straight_opt.s_t < 1.0  # the shrink state is part of what must survive

    first, first_opt = _resume_setup(foreach)
    _run(first, first_opt, 3)
    # through the checkpoint format: JSON structure + safetensors
    tensors: dict[str, torch.Tensor] = {}
    tree = json.loads(json.dumps(to_tree(first_opt.state_dict(), tensors, "optimizer")))
    save_file(tensors, str(tmp_path / "state.safetensors"))
    state = from_tree(tree, load_file(str(tmp_path / "state.safetensors")))

    resumed, resumed_opt = _resume_setup(foreach)
    with torch.no_grad():
        for p, q in zip(resumed, first, strict=True):
            p.copy_(q)
    resumed_opt.load_state_dict(state)
    assert resumed_opt.steps_done == 3 and resumed_opt.s_t == first_opt.s_t
    _run(resumed, resumed_opt, 3, start=3)
    for p, q in zip(resumed, straight, strict=True):
        assert torch.equal(p, q)
    assert resumed_opt.s_t == straight_opt.s_t
    for p, q in zip(resumed, straight, strict=True):
        for key, value in straight_opt.state[q].items():
            assert torch.equal(torch.as_tensor(resumed_opt.state[p][key]), torch.as_tensor(value)), key


def test_state_survives_a_plain_state_dict_round_trip_in_float32_for_half_parameters():
    params = [torch.nn.Parameter(torch.randn(8).bfloat16())]
    opt = DAG(params)
    params[0].grad = torch.randn(8).bfloat16()
    opt.step()
    fresh = DAG(params)
    fresh.load_state_dict(opt.state_dict())
    for key in ("alpha", "saturation", "dag_r", "dag_rms0", "dag_s_t"):
        assert fresh.state[params[0]][key].dtype == torch.float32
        assert torch.equal(fresh.state[params[0]][key], opt.state[params[0]][key])


# -- a tiny ponder model -------------------------------------------------------------------------------

def test_trains_a_tiny_ponder_model_and_logs_its_dials(tmp_path):
    cfg = write_tiny_config(tmp_path, steps=40)
    text = cfg.read_text()
    assert 'name = "adamw"\nlr = 0.003' in text
    cfg.write_text(text.replace('name = "adamw"\nlr = 0.003',
                                'name = "dag"\nlr = 0.003\nmomentum = 0.5\nshrink = { warmup_steps = 10 }'))
    trainer = Trainer(load_config(cfg), tmp_path / "run", progress=False)
    assert isinstance(trainer.optimizer, DAG)
    before = trainer.validate()["loss"]
    after = trainer.train()["loss"]
    assert after < before - 1.0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert train and all(0.1 <= r["optimizer"]["s_t"] <= 1.0 for r in train)
    assert all(r["optimizer"]["alpha_max"] >= r["optimizer"]["alpha_min"] > 0 for r in train)
    resumed = Trainer(None, tmp_path / "run", resume=True, progress=False)
    assert resumed.optimizer.steps_done == 40
    assert resumed.optimizer.s_t == pytest.approx(trainer.optimizer.s_t)
