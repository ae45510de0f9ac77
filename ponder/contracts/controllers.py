"""The controller contract: training-time dials turned at the trainer's events. Torch-free.

A controller plugin registers ``factory(**settings) -> Controller``. The trainer (``ponder train``) and the
Hugging Face callback (``ponder.hf.PonderCallback``) call every controller's events through :func:`dispatch`, in
the order the config lists the controllers:

- ``on_train_start(event)``: once, before the first step (also on resume, with ``event.step`` the step reached).
- ``after_backward(event)``: after the gradients exist, before gradient clipping and the optimizer step.
- ``after_step(event)``: after each optimizer step.
- ``after_eval(event)``: after each validation, with its figures in ``event.metrics``.

A controller turns dials through ``event.dials`` (never by reaching into modules) and keeps its state in
``state_dict()`` / ``load_state_dict()`` (JSON-able values and tensors), so that a resumed run continues with it.
``sets_lr = True`` declares that the controller owns the learning rate: the trainer's own linear warm-up is then
off. Subclass :class:`Controller` and define only the events you need; every other event does nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from ponder.dials import Dials

EVENTS = ("on_train_start", "after_backward", "after_step", "after_eval")


@dataclass
class TrainingEvent:
    """What a controller sees at an event. It turns dials through ``dials`` only.

    ``step`` counts optimizer steps completed: at ``on_train_start`` and ``after_backward`` it is the step about
    to be taken, at ``after_step`` the one just taken. ``loss`` is NaN at ``on_train_start``. ``dials`` defaults
    to the model's own (``model.dials``); a caller whose model has none, such as ``ponder.hf.PonderCallback`` with
    a Hugging Face model, passes the dials it keeps itself.
    """

    name: str
    step: int
    loss: float
    model: torch.nn.Module  # a PonderLM in ponder's trainer
    optimizer: torch.optim.Optimizer
    total_steps: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = print  # a line for the person watching (kept clear of the progress bar)
    dials: Dials | None = None

    def __post_init__(self) -> None:
        if self.name not in EVENTS:
            raise ValueError(f"unknown training event {self.name!r}; the events are {', '.join(EVENTS)}")
        if self.dials is None:
            self.dials = self.model.dials


class Controller:
    """Base class of training-time controllers: every event is a no-op until a subclass defines it."""

    sets_lr: ClassVar[bool] = False  # True: this controller owns the learning rate (the trainer's warm-up is off)

    def on_train_start(self, event: TrainingEvent) -> None:
        """Once, before the first step of this process (a resumed run calls it again at the step it reached)."""

    def after_backward(self, event: TrainingEvent) -> None:
        """After ``loss.backward()``, before gradient clipping and ``optimizer.step()``."""

    def after_step(self, event: TrainingEvent) -> None:
        """After each optimizer step (``event.step`` is the step just taken)."""

    def after_eval(self, event: TrainingEvent) -> None:
        """After each validation; its figures are in ``event.metrics``, its loss in ``event.loss``."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs (JSON-able values and tensors)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def dispatch(controllers: Iterable[Any], event: TrainingEvent) -> None:
    """Call ``event.name`` on every controller in order. A controller that is not a :class:`Controller` (a
    duck-typed third-party one) may leave events out."""
    for ctrl in controllers:
        handler = getattr(ctrl, event.name, None)
        if handler is not None:
            handler(event)


def owns_lr(controllers: Iterable[Any]) -> bool:
    """Whether any controller declares ``sets_lr``: then the trainer leaves the learning rate alone."""
    return any(getattr(ctrl, "sets_lr", False) for ctrl in controllers)
