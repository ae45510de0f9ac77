"""Learning-rate schedules as controllers, on ``torch.optim.lr_scheduler``.

A schedule's position is the trainer's step: the scheduler is created at ``on_train_start`` with
``last_epoch = step - 1`` (so a resumed run is at the right rate from its first step) and stepped
after every optimizer step. While a schedule is listed, the trainer's own linear warm-up is off.
"""

from __future__ import annotations

import math
from typing import Any

from ponder.contracts.controllers import Controller


class _Schedule(Controller):
    sets_lr = True  # tells the trainer that this controller owns the learning rate

    def __init__(self) -> None:
        self.scheduler: Any = None

    def make(self, optimizer: Any, total_steps: int, last_epoch: int) -> Any:
        raise NotImplementedError

    def on_train_start(self, event: Any) -> None:
        for group in event.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.scheduler = self.make(event.optimizer, event.total_steps, event.step - 1)

    def after_step(self, event: Any) -> None:
        self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.scheduler.last_epoch if self.scheduler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore: the position is the trainer's step, read again at ``on_train_start``."""


class WarmupCosine(_Schedule):
    """Linear warm-up to the optimizer's lr, then cosine decay to ``min_lr_ratio`` of it.

    Args:
        warmup_steps: steps of linear warm-up from lr / warmup_steps.
        total_steps: where the cosine reaches its floor (0: the run's train.steps).
        min_lr_ratio: the floor, as a fraction of the peak lr.
    """

    def __init__(self, warmup_steps: int = 100, total_steps: int = 0, min_lr_ratio: float = 0.1) -> None:
        if warmup_steps < 0 or total_steps < 0:
            raise ValueError(f"warmup_steps and total_steps must be >= 0, got {warmup_steps}, {total_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        super().__init__()
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio

    def factor(self, step: int, total: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, total - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def make(self, optimizer: Any, total_steps: int, last_epoch: int) -> Any:
        from torch.optim.lr_scheduler import LambdaLR

        total = self.total_steps or total_steps
        return LambdaLR(optimizer, lambda step: self.factor(step, total), last_epoch=last_epoch)


class StepDecay(_Schedule):
    """Multiply the lr by ``gamma`` every ``step_size`` steps (torch's StepLR).

    Args:
        step_size: steps between decays.
        gamma: the factor applied at each decay.
    """

    def __init__(self, step_size: int = 1000, gamma: float = 0.5) -> None:
        if step_size < 1:
            raise ValueError(f"step_size must be >= 1, got {step_size}")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        super().__init__()
        self.step_size, self.gamma = step_size, gamma

    def make(self, optimizer: Any, total_steps: int, last_epoch: int) -> Any:
        from torch.optim.lr_scheduler import StepLR

        return StepLR(optimizer, self.step_size, self.gamma, last_epoch=last_epoch)
