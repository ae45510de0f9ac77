"""The loss-driven dial controller (the public reference's "AutonomicLayer"), without the reference's bugs.

One loss EWMA per controller: ``running = beta * running + (1 - beta) * loss`` (the first value is
the first loss) and ``delta = loss - running``. For each dial it is given: ``delta < -threshold``
multiplies the dial by ``factor``, ``delta > threshold`` divides it, else it stays. The dial is a
float, rounded only where it is used (so a window can grow by 0.5% a step as well as shrink), and
kept within the controller's ``min``/``max`` as well as the model's own bounds. The public
reference updated its EWMA once per dial (twice a step) and truncated the window with ``int()``
each step, so it could only shrink: neither happens here.
"""

from __future__ import annotations

import math
from typing import Any

from ponder.contracts.controllers import Controller

DEFAULT_DIALS = {"rope_base": {}, "attn_window": {}}
_DIAL_KEYS = ("factor", "threshold", "min", "max")


class Autonomic(Controller):
    """Turns dials (by default the RoPE base and the attention window) up while the loss falls below
    its running average and down while it rises above it.

    Args:
        beta: EWMA factor of the running loss.
        factor: multiplier per step for every dial (overridable per dial).
        threshold: how far the loss must leave its running average before a dial moves (per dial too).
        dials: the dials to turn, each with optional factor, threshold, min, max, e.g.
            {"rope_base": {"min": 1000, "max": 100000}, "attn_window": {"min": 8}}.
        log_every: print the dials every N steps (0: never); they are in metrics.jsonl regardless.
    """

    def __init__(self, beta: float = 0.9, factor: float = 1.005, threshold: float = 0.01,
                 dials: dict | None = None, log_every: int = 200) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if factor <= 0:
            raise ValueError(f"factor must be > 0, got {factor}")
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        if log_every < 0:
            raise ValueError(f"log_every must be >= 0, got {log_every}")
        self.beta, self.log_every = beta, log_every
        self.settings: dict[str, dict[str, float]] = {}
        for name, raw in (DEFAULT_DIALS if dials is None else dials).items():
            unknown = set(raw) - set(_DIAL_KEYS)
            if unknown:
                raise ValueError(f"dials.{name} has unknown key(s) {sorted(unknown)}; valid: {', '.join(_DIAL_KEYS)}")
            s = {"factor": float(raw.get("factor", factor)), "threshold": float(raw.get("threshold", threshold)),
                 "min": float(raw.get("min", -math.inf)), "max": float(raw.get("max", math.inf))}
            if s["factor"] <= 0 or s["threshold"] < 0 or s["min"] > s["max"]:
                raise ValueError(f"dials.{name}: need factor > 0, threshold >= 0 and min <= max, got {s}")
            self.settings[name] = s
        self.running: float | None = None
        self.steps = 0

    def on_train_start(self, event: Any) -> None:
        from ponder.errors import ConfigError

        for name in self.settings:
            if name not in event.dials:
                raise ConfigError(f"autonomic: the model has no dial {name!r}; its dials: {', '.join(event.dials)}")

    def after_step(self, event: Any) -> None:
        loss = float(event.loss)
        if not math.isfinite(loss):
            return
        self.running = loss if self.running is None else self.beta * self.running + (1 - self.beta) * loss
        delta = loss - self.running
        for name, s in self.settings.items():
            value = event.dials.value(name)
            if delta < -s["threshold"]:
                value *= s["factor"]
            elif delta > s["threshold"]:
                value /= s["factor"]
            event.dials.set(name, min(max(value, s["min"]), s["max"]))
        self.steps += 1
        if self.log_every and event.step % self.log_every == 0:
            dials = ", ".join(f"{n} {event.dials.value(n):.4g}" for n in self.settings)
            event.log(f"step {event.step}: {dials} (loss {loss:.4f}, running {self.running:.4f})")

    def state_dict(self) -> dict[str, Any]:
        return {"running": self.running, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.running = state.get("running")
        self.steps = int(state.get("steps", 0))
