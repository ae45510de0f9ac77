"""The ``adyt`` controller: keeps AdaptiveDynamicTanh layers adapting during training."""

from __future__ import annotations

from typing import Any

from ponder.contracts.controllers import Controller, TrainingEvent


class ADyTController(Controller):
    """Calls ``update_adyt_grad_norms(model)`` after backward and before the optimizer step.

    The trainer adds it by itself when the model has ADyT layers (they declare ``training_controller = "adyt"``)
    and the config lists no ``adyt`` controller, so a config that names the ``adyt`` norm trains correctly as it is.

    Args:
        every: update every N optimizer steps (1: every step; fewer updates save time if the cost matters).
    """

    def __init__(self, every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.updates = 0

    def after_backward(self, event: TrainingEvent) -> None:
        from ponder.plugins.norm.dyt import update_adyt_grad_norms

        if event.step % self.every == 0:
            update_adyt_grad_norms(event.model)
            self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state.get("updates", 0))
