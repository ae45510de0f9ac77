"""The hooks a ponder plugin implements.

A plugin is a module with ``@hookimpl`` functions named after these specs. Each hook
receives ``register``, a callback owned by the registry (so the duplicate-name policy
lives in one place)::

    register(name, factory, *, description=None, defaults=None)

``factory`` is a callable or a lazy ``"module:attribute"`` path; prefer the path form
when the module imports torch, so that ``ponder plugins list`` and ``--help`` stay fast.
``description`` is one line (default: the first line of the factory's docstring);
``defaults`` overrides the factory's own keyword defaults.
"""

from __future__ import annotations

from typing import Any, Protocol

import pluggy

PROJECT = "ponder"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Register(Protocol):
    """The callback each hook receives."""

    def __call__(
        self,
        name: str,
        factory: Any,
        *,
        description: str | None = None,
        defaults: dict[str, Any] | None = None,
    ) -> None: ...


@hookspec
def register_norms(register: Register) -> None:
    """Register normalisation layers.

    Factory: ``factory(num_features, *, position="attn", **settings) -> nn.Module``.
    ``position`` is where the norm sits (``attn``, ``ffn``, ``final``, or ``conv`` for
    channels-first features), so per-position settings are possible. The module must be
    pure tensor maths so that it exports to ONNX.
    """


@hookspec
def register_optimizers(register: Register) -> None:
    """Register optimizers.

    Factory: ``factory(params, **settings) -> torch.optim.Optimizer`` over parameters or
    parameter groups, with a faithful ``state_dict()``.
    """


@hookspec
def register_controllers(register: Register) -> None:
    """Register training-time controllers.

    Factory: ``factory(**settings) -> controller``. The trainer calls whichever of the
    controller's methods ``on_train_start(event)``, ``after_backward(event)`` (before the
    optimizer step), ``after_step(event)`` and ``after_eval(event)`` exist, in the order the
    config lists the controllers; ``event`` (``ponder.train.TrainingEvent``) carries the step,
    the total steps, the loss, the model's ``dials``, the optimizer, and ``log(line)``. A
    controller turns dials through ``event.dials`` (never by reaching into modules), and has
    ``state_dict()``/``load_state_dict()`` (JSON-able values and tensors) so that a resumed run
    continues with its state. ``sets_lr = True`` on a controller turns the trainer's own
    learning-rate warm-up off.
    """


@hookspec
def register_halting(register: Register) -> None:
    """Register halting rules for adaptive depth.

    Factory: ``factory(d_model, n_layers, **settings) -> nn.Module`` with a per-layer
    step that is pure tensor maths (it also runs inside the exported ONNX loop) and its
    loss term (ponder cost, KL, ...).
    """
