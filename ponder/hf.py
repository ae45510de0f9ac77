"""ponder inside Hugging Face ``transformers``: convert a model's norms, save and reload it, run ponder's
controllers and optimizers in the HF ``Trainer``. Needs the ``hf`` extra: ``pip install 'ponder[hf]'``.

- :func:`convert_pretrained` swaps a model's LayerNorm / RMSNorm layers for a norm plugin and records
  the swap in ``model.config`` (``ponder_norm``), so ``save_pretrained`` writes it into config.json.
- :func:`from_pretrained` rebuilds such a folder: the model from its config, the recorded swap, then
  the saved safetensors weights, checked key by key. Plain ``AutoModelForCausalLM.from_pretrained``
  would build the original norms and drop the new ones' parameters with a warning.
- :class:`PonderCallback` runs ponder controllers at the Trainer's events, gives a Hugging Face model a
  learning-rate dial (``lr_scale``), logs dials and controller state, and keeps both in the Trainer's
  checkpoints.
- :func:`make_optimizer` builds a ponder optimizer plugin (e.g. ``dag``) for ``Trainer(optimizers=(opt, None))``.

Nothing here downloads: folders are local, and only safetensors and JSON are read (no pickle).
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only where the extra is missing
    raise ImportError("ponder.hf needs Hugging Face transformers and accelerate: pip install 'ponder[hf]'") from exc

from ponder import registry
from ponder.contracts.controllers import TrainingEvent, dispatch
from ponder.contracts.norms import required_controllers
from ponder.conversion import convert
from ponder.dials import Dial, Dials
from ponder.errors import CheckpointError, ConfigError

__all__ = ["CONFIG_KEY", "STATE_FILE", "PonderCallback", "convert_pretrained", "from_pretrained", "make_optimizer"]

CONFIG_KEY = "ponder_norm"  # the list of conversions in config.json
STATE_FILE = "ponder_state.json"  # dials and controller state in a Trainer checkpoint folder
_STATE_TENSORS = "ponder_state.safetensors"  # tensors from controller state, if any


# -- conversion and the save / load round trip ---------------------------------------------------------

def _recorded(config: Any) -> list[dict[str, Any]]:
    steps = getattr(config, CONFIG_KEY, None)
    if steps is None:
        return []
    return [dict(s) for s in (steps if isinstance(steps, list) else [steps])]


def convert_pretrained(model: nn.Module, to: str = "dyt", source: tuple[str, ...] | str = ("layernorm", "rmsnorm"),
                       *, keep_affine: bool = True, **params: Any) -> int:
    """:func:`ponder.convert` on a ``transformers`` model, recorded in ``model.config.ponder_norm``.

    Returns how many layers were replaced. The record (plugin, sources, settings, count) is appended
    to a list, so several conversions replay in order; ``save_pretrained`` writes it into config.json
    and :func:`from_pretrained` replays it. ``keep_affine`` carries the old layers' weight and bias
    into the new ones (see :mod:`ponder.conversion`).
    """
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"convert_pretrained needs a transformers model (with .config), got {type(model).__name__}; "
                        "use ponder.convert for other models")
    sources = [source] if isinstance(source, str) else list(source)
    step: dict[str, Any] = {"to": to, "source": sources, "params": dict(params), "keep_affine": keep_affine}
    try:
        json.dumps(step, allow_nan=False)
    except (TypeError, ValueError):
        raise TypeError(f"convert_pretrained records its settings in config.json, so they must be plain JSON values; "
                        f"got {params!r}") from None
    count = convert(model, to, tuple(sources), keep_affine=keep_affine, **params)
    if count == 0:
        warnings.warn(f"convert_pretrained: no {', '.join(sources)} layer found in {type(model).__name__}; "
                      "nothing recorded", stacklevel=2)
        return 0
    step["count"] = count
    setattr(config, CONFIG_KEY, [*_recorded(config), step])
    return count


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``save_pretrained`` folder: one safetensors file or a sharded index."""
    from safetensors.torch import load_file

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(folder / shard))
        return state
    raise CheckpointError(f"{str(folder)!r} has no model.safetensors or model.safetensors.index.json; ponder reads "
                          "safetensors only (no pickle): save the model with save_pretrained's safetensors default")


def _load_checked(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` into ``model``; every key must match, except tied weights that share a loaded tensor."""
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()
    result = model.load_state_dict(state, strict=False)
    live = model.state_dict(keep_vars=True)
    loaded = {id(live[k]) for k in state if k in live}
    missing = sorted(k for k in result.missing_keys if id(live[k]) not in loaded)
    if missing or result.unexpected_keys:
        raise CheckpointError(f"the saved weights do not fit the rebuilt model: missing {missing[:8]}, "
                              f"unexpected {sorted(result.unexpected_keys)[:8]}")
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()


def from_pretrained(path: str | Path, model_class: Any = None, **kwargs: Any) -> nn.Module:
    """Load a ``save_pretrained`` folder, rebuilding the norms that :func:`convert_pretrained` recorded.

    The model is built from the folder's config (``AutoModelForCausalLM`` unless ``model_class`` is
    given), the recorded conversions are replayed (each must replace as many layers as it did when it
    was recorded), then the safetensors weights are loaded with every key checked: only weights tied to
    a loaded one (GPT-2's ``lm_head`` and ``wte``) may be absent, and they are re-tied. A folder with no
    record loads through ``model_class.from_pretrained`` as plain Hugging Face. ``kwargs`` go to
    ``from_config`` (``_from_config`` for a concrete class) or, for a plain folder, to ``from_pretrained``.
    The model is returned in eval mode, as ``from_pretrained`` does.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{str(folder)!r} is not a folder: ponder.hf.from_pretrained reads a local "
                                "save_pretrained folder and downloads nothing")
    cls = model_class or AutoModelForCausalLM
    config = AutoConfig.from_pretrained(folder)
    steps = _recorded(config)
    if not steps:
        return cls.from_pretrained(folder, **kwargs)
    build = getattr(cls, "from_config", None) or cls._from_config
    model = build(config, **kwargs)
    for i, step in enumerate(steps):
        count = convert(model, step["to"], tuple(step["source"]), keep_affine=step.get("keep_affine", True),
                        **step.get("params", {}))
        if "count" in step and count != step["count"]:
            raise CheckpointError(f"{CONFIG_KEY}[{i}] replaced {step['count']} layers when it was recorded but "
                                  f"{count} now: the model class builds different norms than the one that was saved")
    _load_checked(model, _read_weights(folder))
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()


def make_optimizer(model: nn.Module, name: str = "dag", **params: Any) -> torch.optim.Optimizer:
    """A ponder optimizer plugin over ``model``'s trainable parameters, for ``Trainer(optimizers=(opt, None))``
    (the Trainer then builds its own LR scheduler over it and saves its state in each checkpoint)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    return registry.create("optimizer", name, trainable, **params)


# -- the Trainer callback ----------------------------------------------------------------------------

def _unwrap(optimizer: Any) -> Any:
    """The optimizer itself, under accelerate's ``AcceleratedOptimizer`` wrapper."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _controller_label(ctrl: Any) -> str:
    """The registry name of a controller's class, else the class name in lower case."""
    for info in registry.list_plugins("controller"):
        try:
            if info.load() is type(ctrl):
                return info.key
        except Exception:  # a broken plugin is reported by the registry, not here
            continue
    return type(ctrl).__name__.lower()


def _resolve(spec: Any) -> tuple[str, Any]:
    if isinstance(spec, str):
        return registry.normalize_name(spec), registry.create("controller", spec)
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], Mapping):
        return registry.normalize_name(spec[0]), registry.create("controller", spec[0], **spec[1])
    return _controller_label(spec), spec


def _numbers(prefix: str, value: Any) -> dict[str, float]:
    """The numbers in a (nested) state dict, flattened to ``prefix/key`` for the Trainer's logs."""
    if isinstance(value, Mapping):
        out: dict[str, float] = {}
        for key, item in value.items():
            out.update(_numbers(f"{prefix}/{key}", item))
        return out
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {prefix: value}
    return {}


class PonderCallback(TrainerCallback):
    """Runs ponder controllers inside the Hugging Face ``Trainer``, with a learning-rate dial.

    Events, with the Trainer's order (transformers 4.46 to 5.x clip gradients before
    ``on_pre_optimizer_step``):

    ==============================  ==================  ===============================================
    Trainer event                   ponder event        step / loss the controllers see
    ==============================  ==================  ===============================================
    ``on_train_begin``              ``on_train_start``  steps done; NaN (state restored first on resume)
    ``on_pre_optimizer_step``       ``after_backward``  the step about to be taken; this step's loss
    ``on_step_end``                 ``after_step``      the step just taken; this step's loss
    ``on_evaluate``                 ``after_eval``      steps done; ``metrics["eval_loss"]``
    ==============================  ==================  ===============================================

    ponder's own trainer calls ``after_backward`` before clipping, so there the ``adyt`` update sees
    unclipped gradients; under the Trainer (``max_grad_norm`` > 0) it sees clipped ones.

    The step's loss: callbacks are not handed it, so a forward hook on the model reads ``output.loss``
    of every training forward (model in train mode, gradients on) and combines the micro-batches of
    one optimizer step as the Trainer does: summed when the Trainer passed ``num_items_in_batch`` (the
    model then divides by the whole step's token count), averaged otherwise; across processes it is
    averaged, so every rank turns its dials alike. A model run with label smoothing or a
    ``compute_loss_func`` returns no loss: controllers then see NaN, which ``autonomic`` ignores.

    The dial ``lr_scale`` multiplies whatever learning rate the Trainer's scheduler set, in every
    parameter group, just before ``optimizer.step()``, and the scheduler's value is put back right
    after it, so the scale never compounds and the scheduler never sees it. A model that has ponder
    dials of its own (``model.dials``) shares them with the controllers too.

    At each log the dials (``dial/NAME``), the last applied lr (``lr_applied``), the numbers in each
    controller's state (``controller/NAME/KEY``) and the optimizer's ``metrics()`` (``optimizer/KEY``)
    join the Trainer's logs and ``trainer.state.log_history``. Integrations listed before this
    callback (``report_to``) have logged by then; insert it first to have them see the keys.

    Checkpoints: ``on_save`` writes ``ponder_state.json`` (dials, controller state) into
    ``<output_dir>/checkpoint-<step>``; on resume ``on_train_begin`` reads it from
    ``args.resume_from_checkpoint`` when that names a folder, else from ``<output_dir>/checkpoint-<step>``
    (the Trainer does not tell callbacks the folder it resumed from).

    Args:
        controllers: controller instances, registry names, or ``(name, params)`` pairs. The ``adyt``
            controller is added by itself when the model has ADyT layers, as ponder's trainer does.
        lr_scale: the dial's initial value.
        lr_scale_bounds: the dial's range (controllers may clamp it further).
        log_optimizer: add the optimizer's ``metrics()`` (e.g. DAG's shrink and alphas) to the logs.
    """

    def __init__(self, controllers: Iterable[Any] = (), *, lr_scale: float = 1.0,
                 lr_scale_bounds: tuple[float, float] = (0.01, 100.0), log_optimizer: bool = True) -> None:
        low, high = (float(b) for b in lr_scale_bounds)
        if not 0.0 < low <= float(lr_scale) <= high:
            raise ConfigError(f"need 0 < lr_scale_bounds[0] <= lr_scale <= lr_scale_bounds[1], got lr_scale="
                              f"{lr_scale}, lr_scale_bounds={lr_scale_bounds}")
        self.lr_dial = Dial("lr_scale", float(lr_scale), low, high,
                            doc="multiplies the Trainer's learning rate at every optimizer step")
        self.dials = Dials(self.lr_dial)
        self.controllers: list[tuple[str, Any]] = []
        for spec in controllers:
            self._add(*_resolve(spec))
        self.log_optimizer = log_optimizer
        self.lr_applied: float | None = None
        self.restored_from: str | None = None
        self._model: nn.Module | None = None
        self._optimizer: Any = None
        self._hook: Any = None
        self._micro: list[tuple[torch.Tensor, bool]] = []
        self._loss = math.nan
        self._lr_saved: list[Any] | None = None
        self._lossless_steps = 0
        self._log = lambda line: print(line, file=sys.stderr)

    def _add(self, label: str, ctrl: Any) -> None:
        if getattr(ctrl, "sets_lr", False):
            raise ConfigError(f"controller {label!r} sets the learning rate, which the Trainer's scheduler owns "
                              "(TrainingArguments.lr_scheduler_type); turn the lr_scale dial instead")
        taken = {name for name, _ in self.controllers}
        name, n = label, 1
        while name in taken:
            n += 1
            name = f"{label}{n}"
        self.controllers.append((name, ctrl))

    # -- state ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The dials and each controller's state, by controller name."""
        return {"dials": self.dials.state_dict(),
                "controllers": [{"name": name, "state": ctrl.state_dict() if hasattr(ctrl, "state_dict") else {}}
                                for name, ctrl in self.controllers]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = [c["name"] for c in state["controllers"]]
        mine = [name for name, _ in self.controllers]
        if saved != mine:
            raise CheckpointError(f"the checkpoint's controllers {saved} differ from this callback's {mine}")
        self.dials.load_state_dict(state["dials"])
        for (_, ctrl), entry in zip(self.controllers, state["controllers"], strict=True):
            if hasattr(ctrl, "load_state_dict"):
                ctrl.load_state_dict(entry["state"])

    def save(self, folder: str | Path, step: int) -> Path:
        """Write the state into ``folder`` (JSON; tensors, if a controller keeps any, beside it)."""
        from safetensors.torch import save_file

        from ponder.checkpoint import to_tree

        folder = Path(folder)
        tensors: dict[str, torch.Tensor] = {}
        tree = {"format": "ponder-hf-callback", "global_step": step, **to_tree(self.state_dict(), tensors, "state")}
        if tensors:
            save_file(tensors, folder / _STATE_TENSORS)
        path = folder / STATE_FILE
        path.write_text(json.dumps(tree, indent=1), encoding="utf-8")
        return path

    def load(self, folder: str | Path) -> int:
        """Read the state that :meth:`save` wrote; returns the step it was saved at."""
        from safetensors.torch import load_file

        from ponder.checkpoint import from_tree

        folder = Path(folder)
        tree = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        tensors = load_file(folder / _STATE_TENSORS) if (folder / _STATE_TENSORS).is_file() else {}
        self.load_state_dict(from_tree({k: tree[k] for k in ("dials", "controllers")}, tensors))
        return int(tree["global_step"])

    def _resume(self, args: Any, step: int) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        candidates = []
        if isinstance(getattr(args, "resume_from_checkpoint", None), str):
            candidates.append(Path(args.resume_from_checkpoint))
        candidates.append(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}")
        for folder in candidates:
            if (folder / STATE_FILE).is_file():
                saved = json.loads((folder / STATE_FILE).read_text(encoding="utf-8")).get("global_step")
                if saved == step:
                    self.load(folder)
                    self.restored_from = str(folder)
                    return
        warnings.warn(f"PonderCallback: resuming at step {step} but no {STATE_FILE} saved at that step was found in "
                      f"{', '.join(str(c) for c in candidates)}; the controllers and dials start afresh "
                      "(set TrainingArguments.resume_from_checkpoint to the folder you resume from)", stacklevel=3)

    # -- events ----------------------------------------------------------------------------------------

    def _event(self, name: str, step: int, loss: float, state: Any, metrics: dict[str, Any] | None = None) -> None:
        dispatch([ctrl for _, ctrl in self.controllers],
                 TrainingEvent(name, step, loss, self._model, self._optimizer, state.max_steps, metrics or {},
                               self._log, self.dials))

    def _capture_loss(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        loss = getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            self._micro.append((loss.detach(), kwargs.get("num_items_in_batch") is not None))

    def _step_loss(self, args: Any) -> float:
        """This optimizer step's training loss, from the micro-batches the hook saw."""
        micro, self._micro = self._micro, []
        if not micro:
            self._lossless_steps += 1
            if self._lossless_steps == 1:
                warnings.warn("PonderCallback: the model returned no loss in training (label smoothing or a "
                              "compute_loss_func?); the controllers see NaN", RuntimeWarning, stacklevel=3)
            return math.nan
        losses = torch.stack([loss.float().reshape(()) for loss, _ in micro])
        summed = any(flag for _, flag in micro)
        value = losses.sum() if summed else losses.mean()
        dist = torch.distributed
        world = getattr(args, "world_size", 1)
        if world > 1 and dist.is_available() and dist.is_initialized():
            value = value.reshape(1).clone()
            dist.all_reduce(value)  # SUM: gloo has no AVG
            # with num_items_in_batch counted over every process, each rank's sum is its share of the mean
            global_count = summed and getattr(args, "average_tokens_across_devices", False)
            value = value[0] if global_count else value[0] / world
        return float(value)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._model, self._optimizer = model, _unwrap(optimizer)
        own = getattr(model, "dials", None)
        if isinstance(own, Dials):
            clash = set(own) & {"lr_scale"}
            if clash:
                raise ConfigError(f"the model already has a dial named {sorted(clash)[0]!r}")
            self.dials = Dials(*own.values(), self.lr_dial)
        for name in required_controllers(model, [label for label, _ in self.controllers]):
            self._add(name, registry.create("controller", name))
            self._log(f"PonderCallback: the model's norms need the {name!r} controller (their "
                      "training_controller): added it")
        if self._hook is not None:
            self._hook.remove()
        self._hook = model.register_forward_hook(self._capture_loss, with_kwargs=True)
        self._micro.clear()
        if not state.is_world_process_zero:
            self._log = lambda line: None
        if state.global_step > 0:
            self._resume(args, state.global_step)
        self._event("on_train_start", state.global_step, math.nan, state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._micro.clear()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._loss = self._step_loss(args)
        self._event("after_backward", state.global_step, self._loss, state)
        scale = self.dials.value("lr_scale")
        groups = self._optimizer.param_groups
        self._lr_saved = [group["lr"] for group in groups]
        for group in groups:
            group["lr"] = group["lr"] * scale
        self.lr_applied = float(groups[0]["lr"])

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._lr_saved is not None:
            for group, lr in zip(self._optimizer.param_groups, self._lr_saved, strict=True):
                group["lr"] = lr
            self._lr_saved = None

    def on_step_end(self, args, state, control, **kwargs):
        self._event("after_step", state.global_step, self._loss, state)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self._model is None:  # evaluate() before any training: the controllers have not started
            return
        metrics = dict(metrics or {})
        self._event("after_eval", state.global_step, float(metrics.get("eval_loss", math.nan)), state, metrics)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self._model is None:
            return
        extra: dict[str, float] = {f"dial/{name}": value for name, value in self.dials.snapshot().items()}
        if self.lr_applied is not None:
            extra["lr_applied"] = self.lr_applied
        for name, ctrl in self.controllers:
            if hasattr(ctrl, "state_dict"):
                extra.update(_numbers(f"controller/{name}", ctrl.state_dict()))
        if self.log_optimizer and callable(getattr(self._optimizer, "metrics", None)):
            extra.update(_numbers("optimizer", self._optimizer.metrics()))
        logs.update(extra)
        # Trainer.log appended a copy of ``logs`` to the history just before calling on_log
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_save(self, args, state, control, **kwargs):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        if not args.should_save:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder.is_dir():
            self.save(folder, state.global_step)
        else:
            warnings.warn(f"PonderCallback: no checkpoint folder {str(folder)!r} to save the controllers' state in",
                          stacklevel=2)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
