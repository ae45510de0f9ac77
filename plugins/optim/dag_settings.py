"""DAG's settings: the public reference's defaults, their valid ranges, kappa, and the cosine k schedule."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from functools import lru_cache
from statistics import NormalDist
from typing import Any

HYPER_DEFAULTS: dict[str, float | None] = {
    "tau": 1.25, "p_star": 0.10, "kappa": None, "beta": 1 / 3, "eta": 0.3, "rho": 0.1,
    "eps": 1e-5, "alpha_min": 1e-12, "alpha_max": 1e12,
}
SHRINK_DEFAULTS: dict[str, float | int] = {
    "lambda_rms": 0.3, "s_min": 0.1, "gamma": 1.0, "ema_beta": 0.98, "warmup_steps": 500,
}

# (lower, upper, lower open, upper open) for every numeric setting; None is unbounded.
_RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "lr": (0.0, None, False, True),
    "momentum": (0.0, 1.0, False, True),
    "dampening": (0.0, 1.0, False, False),
    "weight_decay": (0.0, None, False, True),
    "k_val": (0.0, None, True, True),
    "tau": (0.0, None, True, True),
    "p_star": (0.0, 1.0, True, True),
    "kappa": (0.0, None, True, True),
    "beta": (0.0, None, False, True),
    "eta": (0.0, None, False, True),
    "rho": (0.0, 1.0, True, False),
    "eps": (0.0, None, True, True),
    "alpha_min": (0.0, None, False, True),
    "alpha_max": (0.0, None, True, True),
    "lambda_rms": (0.0, None, True, True),
    "s_min": (0.0, 1.0, True, False),
    "gamma": (0.0, None, True, True),
    "ema_beta": (0.0, 1.0, False, True),
    "warmup_steps": (0, None, False, True),
    "sigma_every": (1, None, False, True),
    "sat_every": (1, None, False, True),
}
_INTEGERS = {"warmup_steps", "sigma_every", "sat_every"}



def _label(key: str) -> str:
    if key in HYPER_DEFAULTS:
        return f"hyper[{key!r}]"
    if key in SHRINK_DEFAULTS:
        return f"shrink[{key!r}]"
    return key


def _interval(key: str) -> str:
    lo, hi, lo_open, hi_open = _RANGES[key]
    left = "(-inf" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
    right = "inf)" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
    return f"{left}, {right}"


def _checked(key: str, value: Any, where: str = "") -> float | int:
    """``value`` as a plain float (or int), or a ValueError naming the key and its valid range."""
    kind = "an integer" if key in _INTEGERS else "a number"
    ok_type = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok_type and key in _INTEGERS:
        ok_type = float(value).is_integer()
    if not ok_type:
        raise ValueError(f"DAG: {_label(key)}{where} must be {kind} in {_interval(key)}, got {value!r}")
    v = int(value) if key in _INTEGERS else float(value)
    lo, hi, lo_open, hi_open = _RANGES[key]
    bad = math.isnan(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or (
        hi is not None and (v >= hi if hi_open else v > hi))
    if bad:
        raise ValueError(f"DAG: {_label(key)}{where} must be in {_interval(key)}, got {value!r}")
    return v


def _settings(name: str, given: Mapping[str, Any] | None, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults`` updated with ``given``, refusing keys that are not in ``defaults``."""
    if given is None:
        return dict(defaults)
    if not isinstance(given, Mapping):
        raise ValueError(f"DAG: {name} must be a dict with keys {', '.join(defaults)}; got {given!r}")
    unknown = [k for k in given if k not in defaults]
    if unknown:
        raise ValueError(f"DAG: unknown {name} key {unknown[0]!r}; valid keys: {', '.join(defaults)}")
    return {**defaults, **given}


@lru_cache(maxsize=64)
def derived_kappa(tau: float, p_star: float) -> float:
    """``tau / Phi^-1(1 - p_star / 2)``: the alpha that puts a fraction ``p_star`` of Gaussian entries past ``tau``."""
    return tau / NormalDist().inv_cdf(1.0 - p_star / 2.0)


def cosine_k_schedule(k_max: float, k_min: float, total_steps: int) -> Callable[[int], float]:
    """A ``k_sched`` for :class:`DAG`: ``k`` falls from ``k_max`` at step 0 to ``k_min`` at ``total_steps`` along
    half a cosine, and stays at ``k_min`` after.

    Args:
        k_max: k at step 0.
        k_min: k from step ``total_steps`` on.
        total_steps: length of the cosine, in optimizer steps.
    """
    if not (k_max > 0 and k_min > 0):
        raise ValueError(f"cosine_k_schedule: k_max and k_min must be > 0, got {k_max!r} and {k_min!r}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"cosine_k_schedule: total_steps must be an integer >= 1, got {total_steps!r}")
    k_max, k_min = float(k_max), float(k_min)

    def k_at(step: int) -> float:
        frac = min(max(step, 0), total_steps) / total_steps
        return k_min + 0.5 * (k_max - k_min) * (1.0 + math.cos(math.pi * frac))

    k_at.__doc__ = f"cosine k from {k_max:g} to {k_min:g} over {total_steps} steps"
    return k_at
