"""Dials: named, bounded values a model exposes for controllers to turn during training.

A dial is kept as a float and rounded only where it is used (``Dial.as_int``), so a window
can grow by 0.5% a step as well as shrink. Setting a dial clamps it into its bounds; a value
given by the user in a config is checked instead (:meth:`Dial.check`), so a typo is an error.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from ponder.errors import ConfigError


@dataclass
class Dial:
    name: str
    value: float
    min: float
    max: float
    integer: bool = False  # rounded where it is used (e.g. an attention window)
    min_inclusive: bool = True
    doc: str = ""

    def check(self, value: float) -> float:
        """Return ``value`` as a float, or raise naming the dial and its valid range."""
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"dial {self.name!r} must be a number, got {value!r}") from None
        low_ok = value >= self.min if self.min_inclusive else value > self.min
        if not (math.isfinite(value) and low_ok and value <= self.max):
            left = "[" if self.min_inclusive else "("
            raise ConfigError(f"{self.name} = {value!r} is outside {left}{self.min:g}, {self.max:g}]")
        return value

    def set(self, value: float) -> float:
        """Turn the dial, clamped into its bounds; returns the new value."""
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"dial {self.name!r} cannot be set to {value!r}")
        low = self.min if self.min_inclusive else math.nextafter(self.min, math.inf)
        self.value = min(max(value, low), self.max)
        return self.value

    def as_int(self) -> int:
        return int(round(self.value))


class Dials(Mapping[str, Dial]):
    """The model's dials by name; every module reads them at use, so a change reaches all of them."""

    def __init__(self, *dials: Dial) -> None:
        self._dials = {d.name: d for d in dials}

    def __getitem__(self, name: str) -> Dial:
        try:
            return self._dials[name]
        except KeyError:
            raise KeyError(f"unknown dial {name!r}; the model has: {', '.join(self._dials)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._dials)

    def __len__(self) -> int:
        return len(self._dials)

    def value(self, name: str) -> float:
        return self[name].value

    def set(self, name: str, value: float) -> float:
        return self[name].set(value)

    def snapshot(self) -> dict[str, float]:
        """Every dial's current value."""
        return {name: d.value for name, d in self._dials.items()}

    def state_dict(self) -> dict[str, float]:
        return self.snapshot()

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        unknown = set(state) - set(self._dials)
        if unknown:
            raise KeyError(f"checkpoint has unknown dials {sorted(unknown)}; the model has: {', '.join(self._dials)}")
        for name, value in state.items():
            self._dials[name].value = float(value)
