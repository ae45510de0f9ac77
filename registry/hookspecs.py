"""The hooks a ponder plugin implements.

A plugin is a module with ``@hookimpl`` functions named after these specs. Each hook
receives ``register``, a callback owned by the registry (so the duplicate-name policy
lives in one place)::

    register(name, factory, *, description=None, defaults=None)

``factory`` is a callable or a lazy ``"module:attribute"`` path; prefer the path form
when the module imports torch, so that ``ponder plugins list`` and ``--help`` stay fast.
``description`` is one line (default: the first line of the factory's docstring);
``defaults`` overrides the factory's own keyword defaults.

What each factory must return is a contract of ponder's core, in ``ponder.contracts`` (halting, norms,
controllers); docs/plugins.md walks through one plugin of each kind.
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
    channels-first features, see ``ponder.contracts.norms.ChannelsFirst``), so per-position
    settings are possible. A factory that takes ``input_std`` receives, from ponder's language model,
    the std of the norm's input at initialisation (``ponder.contracts.norms.stream_std_at_init``);
    elsewhere (converting a model) it gets None. The module must be pure tensor maths so that it
    exports to ONNX. Optional capabilities (``ponder.contracts.norms``): ``split_affine()``
    (``FoldableNorm``: export folds the affine into the next linear layer),
    ``training_controller = "name"`` (``NeedsController``: the trainer adds that controller),
    ``keeps_input_scale = True`` (``KeepsInputScale``: the model scales its embeddings),
    ``metrics()`` (logged).
    """


@hookspec
def register_optimizers(register: Register) -> None:
    """Register optimizers.

    Factory: ``factory(params, **settings) -> torch.optim.Optimizer`` over parameters or
    parameter groups, with a faithful ``state_dict()`` (a resumed run continues from it);
    ``metrics() -> dict``, if defined, is logged by the trainer.
    """


@hookspec
def register_controllers(register: Register) -> None:
    """Register training-time controllers.

    Factory: ``factory(**settings) -> ponder.contracts.controllers.Controller``. The trainer and
    the Hugging Face callback call its events ``on_train_start``, ``after_backward`` (before the
    optimizer step), ``after_step`` and ``after_eval`` with a ``TrainingEvent`` (step, total
    steps, loss, the model's ``dials``, the optimizer, ``log(line)``), in the order the config
    lists the controllers. A controller turns dials through ``event.dials``, keeps its state in
    ``state_dict()``/``load_state_dict()``, and declares ``sets_lr = True`` if it owns the
    learning rate. Subclass ``Controller``: every event you leave out does nothing.
    """


@hookspec
def register_halting(register: Register) -> None:
    """Register halting rules for adaptive depth.

    Factory: ``factory(d_model, n_layers, **settings) -> ponder.contracts.halting.HaltingRule``:
    ``init_state(x)``, a per-layer ``step(state, s, layer, threshold)`` that is pure tensor maths
    (it also runs inside the exported ONNX loop), ``loss(state)`` (ponder cost, KL, ...) and
    ``per_layer_task_loss``. Subclassing ``HaltingRule`` gives the shared step: define ``mass``.
    """
