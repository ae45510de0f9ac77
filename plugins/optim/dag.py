"""DAG, the Dynamic-Alpha Gradient optimizer, after its public reference (maths in ALGORITHMS.md).

Per parameter tensor ``p`` with gradient ``g`` of size ``d``, at step ``t = 0, 1, 2, ...``:

- ``N = ||g||``, ``sigma = N / sqrt(d)`` (or the exact standard deviation of ``g``);
- ``alpha_hat = kappa * (N + eps) / (sigma + eps) * (d / d_total)**beta * (p_star / (S + eps))**eta * s_t``,
  ``alpha = clip((1 - rho) * alpha + rho * alpha_hat, alpha_min, alpha_max)`` (alpha starts at 1);
- ``z = (alpha / s_t) * g / (N + eps)``, ``u = k * s_t * tanh(z)``, the saturation ``S = mean(|z| > tau)``
  measured every ``sat_every`` steps (it starts at ``p_star``);
- ``u += weight_decay * p``; momentum ``buf = momentum * buf + (1 - dampening) * u`` (buffer from zero), then
  ``u = u + momentum * buf`` (Nesterov) or ``u = buf``; ``p -= lr * u``.

Once per step, over all tensors: ``rms = sqrt(sum(u**2) / sum(d))``, its EMA ``r``, a baseline ``RMS0`` tracked
during ``warmup_steps``, and the global shrink used at the next step,
``s_t = s_min + (1 - s_min) * clip(r / (lambda_rms * RMS0), 0, 1)**gamma``.

Where we differ from the public reference, on purpose (ALGORITHMS.md lists these gaps): ``S`` starts at ``p_star``
rather than 0 (which inflates the first target by ``(p_star / eps)**eta``, about 16); ``maximize`` negates the gradient
first, as torch does, rather than the final update; ``lambda_rms`` and ``s_min`` are accepted at top level as the
reference's quick start passes them. Choices where the sources say nothing: with ``use_exact_sigma``, the steps between
exact ones use ``N / sqrt(d)``, and the exact value is the population standard deviation; with ``warmup_steps=0``
the baseline ``RMS0`` is the first step's ``r``; a zero baseline leaves ``s_t`` at 1.

Speed: the ``foreach`` path (the default) runs torch's multi-tensor kernels and computes the per-tensor scalars
(norms, alpha, saturation) as vectors, with no host synchronisation on GPUs. On CPU it computes ``tanh(z)`` as
``2 * sigmoid(2z) - 1`` (torch's CPU tanh is about 4x slower than its sigmoid; the two agree to float32 rounding) and
keeps one scratch tensor per parameter between steps (allocating it anew each step costs more than the arithmetic).
``foreach=False`` is the plain per-tensor loop, the reference the foreach path is tested against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from .dag_settings import (  # noqa: F401  (cosine_k_schedule is public here too)
    HYPER_DEFAULTS,
    SHRINK_DEFAULTS,
    _checked,
    _settings,
    cosine_k_schedule,
    derived_kappa,
)

# State kept in float32 whatever the parameter's dtype (torch would cast it to the parameter's dtype on load).
_FLOAT32_STATE = ("alpha", "saturation", "dag_r", "dag_rms0", "dag_s_t")


class DAG(torch.optim.Optimizer):
    """Dynamic-Alpha Gradient: a tanh-bounded update whose per-tensor gain alpha is steered to a target saturation.

    Each tensor's normalised gradient is scaled by alpha, squashed by ``tanh`` and scaled by ``k``, so every
    element moves by at most ``lr * k`` per step (before momentum and weight decay); alpha follows the fraction of
    entries past ``tau``, and a global shrink ``s_t`` lowers the amplitude once the update's RMS has fallen below
    ``lambda_rms`` times its warm-up level. Dials: ``opt.s_t``, ``opt.k_val``, ``opt.state[p]["alpha"]`` and
    ``opt.metrics()``.

    Args:
        params: parameters or parameter groups to optimise (supplied by ponder); groups may override any scalar.
        lr: learning rate (eta), the step size multiplying the bounded update.
        momentum: momentum factor in [0, 1); the buffer starts at zero.
        dampening: dampening of the momentum buffer's input, in [0, 1].
        weight_decay: coupled L2 penalty, added to the update as ``weight_decay * p``.
        k_val: amplitude k of the tanh-bounded update (the per-element bound before lr).
        k_sched: callable(step) -> k, used instead of k_val when given (see ``cosine_k_schedule``).
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0).
        maximize: ascend the objective instead of descending (the gradient's sign is flipped first).
        foreach: use torch's multi-tensor kernels; None picks them (faster on CPU and CUDA).
        differentiable: not supported (must be False).
        fused: not supported (None or False).
        hyper: alpha controller, defaults tau 1.25, p_star 0.1, kappa None (tau / Phi^-1(1 - p_star / 2)),
            beta 1/3, eta 0.3, rho 0.1, eps 1e-5, alpha_min 1e-12, alpha_max 1e12.
        shrink: global RMS shrink, defaults lambda_rms 0.3, s_min 0.1, gamma 1.0, ema_beta 0.98, warmup_steps 500.
        lambda_rms: shortcut for shrink['lambda_rms'] (the reference's quick start passes it here).
        s_min: shortcut for shrink['s_min'], the floor of the global shrink.
        use_exact_sigma: use the exact standard deviation of each gradient instead of ``||g|| / sqrt(d)``.
        sigma_every: with use_exact_sigma, compute the exact sigma every this many steps.
        sat_every: measure each tensor's saturation every this many steps.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        k_val: float = 2.0,
        k_sched: Callable[[int], float] | None = None,
        nesterov: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        hyper: dict[str, Any] | None = None,
        shrink: dict[str, Any] | None = None,
        lambda_rms: float | None = None,
        s_min: float | None = None,
        use_exact_sigma: bool = False,
        sigma_every: int = 1,
        sat_every: int = 10,
    ) -> None:
        if differentiable:
            raise ValueError("DAG: differentiable=True is not implemented; use differentiable=False")
        if fused:
            raise ValueError("DAG: fused=True is not implemented; use fused=None (foreach kernels are the fast path)")
        if k_sched is not None and not callable(k_sched):
            raise ValueError(f"DAG: k_sched must be a callable(step) -> k or None, got {k_sched!r}")
        hyper_values = _settings("hyper", hyper, HYPER_DEFAULTS)
        shrink_values = _settings("shrink", shrink, SHRINK_DEFAULTS)
        for key, value in (("lambda_rms", lambda_rms), ("s_min", s_min)):
            if value is None:
                continue
            if shrink is not None and key in shrink and shrink[key] != value:
                raise ValueError(f"DAG: {key} given twice, {value!r} at top level and {shrink[key]!r} in shrink; "
                                 "give it once")
            shrink_values[key] = value
        self.shrink = {k: _checked(k, v) for k, v in shrink_values.items()}
        if not isinstance(use_exact_sigma, bool):
            raise ValueError(f"DAG: use_exact_sigma must be True or False, got {use_exact_sigma!r}")
        self.use_exact_sigma = use_exact_sigma
        self.sigma_every = _checked("sigma_every", sigma_every)
        self.sat_every = _checked("sat_every", sat_every)
        self.k_sched = k_sched
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, k_val=k_val,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=False, fused=fused,
                        **hyper_values)
        self._d_total: int | None = None
        self._consts: dict[tuple, dict[str, Any]] = {}
        self._k_last: float | None = None
        self._work: dict[Tensor, Tensor] = {}
        super().__init__(params, defaults)

    # -- parameter groups ------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; it may override any setting, with the alpha controller's either flat or under ``hyper``."""
        param_group = dict(param_group)
        if "hyper" in param_group:
            hyper = param_group.pop("hyper")
            _settings("hyper", hyper, HYPER_DEFAULTS)  # refuses unknown keys
            param_group.update(hyper)
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1], len(self.param_groups) - 1)
        except ValueError:
            self.param_groups.pop()
            raise
        self._d_total = None
        self._consts.clear()

    @staticmethod
    def _check_group(group: dict[str, Any], index: int) -> None:
        where = f" (parameter group {index})" if index else ""
        for key in ("lr", "momentum", "dampening", "weight_decay", "k_val", *HYPER_DEFAULTS):
            if key == "kappa" and group[key] is None:
                continue
            group[key] = _checked(key, group[key], where)
        for key in ("nesterov", "maximize", "differentiable"):
            if not isinstance(group[key], bool):
                raise ValueError(f"DAG: {key}{where} must be True or False, got {group[key]!r}")
        for key in ("foreach", "fused"):
            if group[key] is not None and not isinstance(group[key], bool):
                raise ValueError(f"DAG: {key}{where} must be True, False or None, got {group[key]!r}")
        if group["differentiable"] or group["fused"]:
            raise ValueError(f"DAG: differentiable and fused{where} are not implemented; leave them off")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"DAG: nesterov=True{where} needs momentum in (0, 1) and dampening 0, got momentum "
                             f"{group['momentum']!r} and dampening {group['dampening']!r}")
        if group["alpha_min"] > group["alpha_max"]:
            raise ValueError(f"DAG: hyper['alpha_min']{where} must be <= hyper['alpha_max'], got "
                             f"{group['alpha_min']!r} > {group['alpha_max']!r}")
        for p in group["params"]:
            if p.is_complex():
                raise ValueError(f"DAG: complex parameters{where} are not supported (got one of shape "
                                 f"{tuple(p.shape)}); optimise torch.view_as_real of them instead")

    def _total_size(self) -> int:
        """``d_total``: the size of all parameters the optimizer handles."""
        if self._d_total is None:
            self._d_total = sum(p.numel() for g in self.param_groups for p in g["params"])
        return self._d_total

    # -- state ---------------------------------------------------------------------------------------

    @property
    def _anchor(self) -> Tensor:
        """The parameter whose state also holds the optimizer-wide state (so that state_dict() saves it)."""
        return self.param_groups[0]["params"][0]

    def _global(self) -> dict[str, Any]:
        state = self.state[self._anchor]
        if "dag_step" not in state:
            device = self._anchor.device
            state["dag_step"] = 0
            state["dag_r"] = torch.zeros((), dtype=torch.float32, device=device)
            state["dag_rms0"] = torch.zeros((), dtype=torch.float32, device=device)
            state["dag_s_t"] = torch.ones((), dtype=torch.float32, device=device)
        return state

    def _param_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if "alpha" not in state:
            state["alpha"] = torch.ones((), dtype=torch.float32, device=p.device)
            state["saturation"] = torch.full((), group["p_star"], dtype=torch.float32, device=p.device)
        if group["momentum"] > 0 and "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; alpha, saturation and the shrink state stay float32 whatever the parameters' dtype."""
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(saved_id, {})
            for key in _FLOAT32_STATE:
                if isinstance(saved.get(key), Tensor):
                    self.state[p][key] = saved[key].to(device=p.device, dtype=torch.float32, copy=True)
        self._d_total = None
        self._consts.clear()
        self._k_last = None

    # -- dials ---------------------------------------------------------------------------------------

    @property
    def s_t(self) -> float:
        """The global shrink that the next step uses (1 during warm-up)."""
        state = self.state.get(self._anchor, {})
        return float(state["dag_s_t"]) if "dag_s_t" in state else 1.0

    @property
    def k_val(self) -> float:
        """The amplitude k of the last step (``k_sched(step)`` when a schedule is set, else ``k_val``)."""
        if self._k_last is not None:
            return self._k_last
        if self.k_sched is not None:
            return float(self.k_sched(self.steps_done))
        return float(self.param_groups[0]["k_val"])

    @k_val.setter
    def k_val(self, value: float) -> None:
        value = _checked("k_val", value)
        for group in self.param_groups:
            group["k_val"] = value
        self._k_last = None

    @property
    def steps_done(self) -> int:
        """Optimizer steps taken so far (the ``t`` of the next step)."""
        return int(self.state.get(self._anchor, {}).get("dag_step", 0))

    def metrics(self) -> dict[str, float]:
        """The dials as plain floats: ``s_t``, ``k`` and alpha's mean, min and max over tensors, mean saturation."""
        states = [s for s in self.state.values() if "alpha" in s]
        if not states:  # no step yet: alpha's initial value, saturation's starting point
            return {"s_t": self.s_t, "k": float(self.k_val), "alpha_mean": 1.0, "alpha_min": 1.0, "alpha_max": 1.0,
                    "saturation_mean": float(self.param_groups[0]["p_star"])}
        device = states[0]["alpha"].device
        a = torch.stack([s["alpha"].to(device) for s in states])
        sat = torch.stack([s["saturation"].to(device) for s in states])
        s_t = self._global()["dag_s_t"].to(device)
        values = torch.stack([s_t, a.mean(), a.min(), a.max(), sat.mean()]).tolist()  # one host sync
        keys = ("s_t", "alpha_mean", "alpha_min", "alpha_max", "saturation_mean")
        return {"k": float(self.k_val), **dict(zip(keys, values, strict=True))}

    # -- the step --------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One DAG step over all parameters that have a gradient; returns the closure's loss if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None and p.numel() > 0]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("DAG does not support sparse gradients")
            if params:
                work.append((group, params))
        if not work:
            return loss
        glob = self._global()
        t = glob["dag_step"]
        k_sched = self.k_sched(t) if self.k_sched is not None else None
        s_prev = glob["dag_s_t"]
        ctx = {
            "t": t, "s_prev": s_prev, "d_total": self._total_size(),
            "sat_step": t % self.sat_every == 0,
            "sigma_step": self.use_exact_sigma and t % self.sigma_every == 0,
        }
        parts: list[Tensor] = []  # sums of squares of the updates
        count = 0
        for group, params in work:
            k = group["k_val"] if k_sched is None else k_sched
            states = [self._param_state(p, group) for p in params]
            foreach = group["foreach"] if group["foreach"] is not None else True
            if foreach:
                buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
                for i, p in enumerate(params):
                    buckets.setdefault((p.device, p.dtype), []).append(i)
                for idx in buckets.values():
                    sq = self._foreach_update(group, [params[i] for i in idx], [states[i] for i in idx], k, ctx)
                    parts.append(sq.to(s_prev.device))
            else:
                for p, state in zip(params, states, strict=True):
                    parts.append(self._single_update(group, p, state, k, ctx).to(s_prev.device))
            count += sum(p.numel() for p in params)
        sumsq = parts[0] if len(parts) == 1 else torch.stack(parts).sum()
        self._update_shrink(glob, sumsq, count, t)
        glob["dag_step"] = t + 1
        self._k_last = float(k_sched if k_sched is not None else work[0][0]["k_val"])
        return loss

    def _update_shrink(self, glob: dict[str, Any], sumsq: Tensor, count: int, t: int) -> None:
        """The global RMS of this step's updates, its EMA ``r``, the baseline ``RMS0`` and the next ``s_t``."""
        cfg = self.shrink
        ema = cfg["ema_beta"]
        rms = torch.sqrt(sumsq / count)
        r = rms if t == 0 else ema * glob["dag_r"] + (1.0 - ema) * rms
        if t < cfg["warmup_steps"]:
            rms0 = r if t == 0 else ema * glob["dag_rms0"] + (1.0 - ema) * r
            s_t = torch.ones_like(r)
        else:
            rms0 = r if t == 0 else glob["dag_rms0"]
            ratio = torch.where(rms0 > 0, (r / (cfg["lambda_rms"] * rms0)).clamp(0.0, 1.0), torch.ones_like(r))
            s_t = cfg["s_min"] + (1.0 - cfg["s_min"]) * ratio.pow(cfg["gamma"])
        glob["dag_r"], glob["dag_rms0"], glob["dag_s_t"] = r.float(), rms0.float(), s_t.float()

    def _alpha_update(self, group: dict[str, Any], alpha: Tensor, sat: Tensor, norm: Tensor, sigma: Tensor,
                      dim_factor: Tensor | float, s_prev: Tensor) -> Tensor:
        """The new alpha (same shape as ``alpha``: one tensor's scalar, or a vector over tensors)."""
        eps = group["eps"]
        kappa = group["kappa"] if group["kappa"] is not None else derived_kappa(group["tau"], group["p_star"])
        target = (kappa * (norm + eps) / (sigma + eps) * dim_factor
                  * (group["p_star"] / (sat + eps)).pow(group["eta"]) * s_prev)
        rho = group["rho"]
        return ((1.0 - rho) * alpha + rho * target).clamp(group["alpha_min"], group["alpha_max"])

    def _single_update(self, group: dict[str, Any], p: Tensor, state: dict[str, Any], k: float,
                       ctx: dict[str, Any]) -> Tensor:
        """Update one tensor; returns the sum of squares of its final update (float32, on its device)."""
        g = -p.grad if group["maximize"] else p.grad
        d = g.numel()
        s_prev = ctx["s_prev"].to(p.device)
        norm = torch.linalg.vector_norm(g, dtype=torch.float32)
        if ctx["sigma_step"]:
            sigma = g.float().std(correction=0)
        else:
            sigma = norm * (1.0 / math.sqrt(d))
        dim_factor = (d / ctx["d_total"]) ** group["beta"]
        alpha = self._alpha_update(group, state["alpha"], state["saturation"], norm, sigma, dim_factor, s_prev)
        state["alpha"].copy_(alpha)
        z = g * (alpha / ((norm + group["eps"]) * s_prev))
        if ctx["sat_step"]:
            state["saturation"].copy_((z.abs() > group["tau"]).float().mean())
        u = torch.tanh(z).mul_(k * s_prev)
        if group["weight_decay"]:
            u.add_(p, alpha=group["weight_decay"])
        if group["momentum"] > 0:
            buf = state["momentum_buffer"]
            buf.mul_(group["momentum"]).add_(u, alpha=1.0 - group["dampening"])
            u = u.add_(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        sq = torch.linalg.vector_norm(u, dtype=torch.float32).square()
        p.add_(u, alpha=-group["lr"])
        return sq

    def _constants(self, params: list[Tensor], d_total: int, beta: float) -> dict[str, Any]:
        """Per-tensor ``1 / sqrt(d)``, ``1 / d`` and ``(d / d_total)**beta`` as float32 vectors on the tensors'
        device (cached, so that no host-to-device copy happens at each step)."""
        key = (tuple(id(p) for p in params), d_total, beta)
        if key not in self._consts:
            if len(self._consts) > 64:  # the set of tensors with gradients keeps changing: do not grow forever
                self._consts.clear()
            sizes = [p.numel() for p in params]
            device = params[0].device
            values = [[1.0 / math.sqrt(d) for d in sizes], [1.0 / d for d in sizes],
                      [(d / d_total) ** beta for d in sizes]]
            inv_sqrt, inv, dim = torch.tensor(values, dtype=torch.float32, device=device).unbind()
            self._consts[key] = {"inv_sqrt_d": inv_sqrt, "inv_d": inv, "dim_factor": dim}
        return self._consts[key]

    def _scratch(self, params: list[Tensor]) -> list[Tensor]:
        """One scratch tensor per parameter, reused from step to step (not part of the optimizer's state)."""
        out = []
        for p in params:
            t = self._work.get(p)
            if t is None or t.shape != p.shape or t.dtype != p.dtype or t.device != p.device:
                t = self._work[p] = torch.empty_like(p, memory_format=torch.contiguous_format)
            out.append(t)
        return out

    def _foreach_update(self, group: dict[str, Any], params: list[Tensor], states: list[dict[str, Any]], k: float,
                        ctx: dict[str, Any]) -> Tensor:
        """Update tensors of one device and dtype with multi-tensor kernels; per-tensor scalars (norms, alpha,
        saturation) are computed as one vector. On CPU the scalars that scale whole tensors are read on the host
        (free there, and it saves a pass); elsewhere they stay on the device, so there is no host synchronisation.
        Returns the sum of squares of the updates."""
        grads = [p.grad for p in params]
        device = params[0].device
        host = device.type == "cpu"
        s_prev = ctx["s_prev"].to(device)
        consts = self._constants(params, ctx["d_total"], group["beta"])
        inv_sqrt_d, inv_d, dim_factor = consts["inv_sqrt_d"], consts["inv_d"], consts["dim_factor"]
        norm = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))
        if ctx["sigma_step"]:
            sigma = torch.stack([g.float().std(correction=0) for g in grads])
        else:
            sigma = norm * inv_sqrt_d
        alphas = [s["alpha"] for s in states]
        sats = [s["saturation"] for s in states]
        alpha = self._alpha_update(group, torch.stack(alphas), torch.stack(sats), norm, sigma, dim_factor, s_prev)
        torch._foreach_copy_(alphas, alpha.unbind())
        coef = alpha / ((norm + group["eps"]) * s_prev)  # z = coef * g
        if group["maximize"]:  # g is -grad: norms and sigma do not see the sign, z does
            coef = -coef
        tau = group["tau"]
        if host:
            # CPU: torch's tanh is slow there (about 4x a sigmoid), so tanh(z) = 2 * sigmoid(2z) - 1, with z doubled
            # exactly by doubling coef; into scratch tensors kept between steps, since allocating them anew costs
            # more than the arithmetic
            z = self._scratch(params)
            torch._foreach_copy_(z, grads)
            torch._foreach_mul_(z, (2.0 * coef).tolist())
            tau = 2.0 * tau
        else:
            # a list of 0-dim tensors makes torch run one kernel per tensor here, which still beats building a
            # per-element coefficient (measured on an H100: repeat_interleave cost more than the whole update)
            z = torch._foreach_mul(grads, coef.unbind())
        if ctx["sat_step"]:
            # 1 where |z| > tau, else 0 (|z| - tau is exactly 0 only at |z| == tau), summed by an L1 norm
            over = torch._foreach_abs(z)
            torch._foreach_sub_(over, tau)
            torch._foreach_clamp_min_(over, 0.0)
            torch._foreach_sign_(over)
            counts = torch.stack(torch._foreach_norm(over, 1, dtype=torch.float32))
            torch._foreach_copy_(sats, (counts * inv_d).unbind())
        # u = ks * tanh(z) (+ weight decay, momentum); on CPU ks is folded into the next kernel's scalar
        if host:
            torch._foreach_sigmoid_(z)
            torch._foreach_mul_(z, 2.0)
            torch._foreach_sub_(z, 1.0)
            ks = float(k * s_prev)
        else:
            torch._foreach_tanh_(z)
            torch._foreach_mul_(z, k * s_prev)
            ks = 1.0
        lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
        if momentum > 0:
            bufs = [s["momentum_buffer"] for s in states]
            keep = 1.0 - group["dampening"]
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, z, alpha=keep * ks)
            if wd:
                torch._foreach_add_(bufs, params, alpha=keep * wd)
            if group["nesterov"]:
                if ks != 1.0:
                    torch._foreach_mul_(z, ks)
                if wd:
                    torch._foreach_add_(z, params, alpha=wd)
                torch._foreach_add_(z, bufs, alpha=momentum)
                u, scale = z, 1.0
            else:
                u, scale = bufs, 1.0
        elif wd:
            if ks != 1.0:
                torch._foreach_mul_(z, ks)
            torch._foreach_add_(z, params, alpha=wd)
            u, scale = z, 1.0
        else:
            u, scale = z, ks
        sq = torch.stack(torch._foreach_norm(u, 2, dtype=torch.float32)).square().sum() * (scale * scale)
        torch._foreach_add_(params, u, alpha=-lr * scale)
        return sq
