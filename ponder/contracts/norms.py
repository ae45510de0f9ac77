"""The norm contract: what a norm plugin builds, and the capabilities ponder looks for instead of classes.

A norm plugin registers ``factory(num_features, *, position="attn", **settings) -> nn.Module``. ``position`` is
where the norm sits (``attn``, ``ffn``, ``final`` in ponder's language model, or ``conv`` for channels-first
features ``[N, C, ...]``, which :class:`ChannelsFirst` adapts any last-dimension norm to). A factory that also takes
``input_std`` gets, from ponder's language model, the std of the norm's input at initialisation
(:func:`stream_std_at_init`), and None where nobody knows it (converting a model): DyT picks its alpha from it.
The module must be pure tensor maths so that it exports to ONNX. ``metrics() -> dict[str, float]``, if defined, is
logged by the trainer.

Optional capabilities, each a method or attribute the norm defines; export, the model, the trainer and the Hugging
Face callback find them on any norm, built-in or third-party:

- :class:`FoldableNorm`: ``split_affine()`` returns the norm as ``core(x) * weight + bias``; export then folds
  ``weight`` and ``bias`` into the linear layer the norm feeds (``W' = W diag(weight)``, ``c' = W bias + c``)
  and keeps only ``core`` in the graph.
- :class:`NeedsController`: ``training_controller`` names a registered controller that must run while the norm
  trains (ADyT's gradient-norm update). The trainer and the callback add it when the config lists none of
  that name (:func:`required_controllers`).
- :class:`KeepsInputScale`: ``keeps_input_scale = True`` says the norm computes no statistics, so its output scales
  with its input (DyT, ADyT). Ponder's language model then multiplies its token embeddings by a learnable scalar
  initialised to ``sqrt(d_model)`` (:func:`wants_embedding_scale`), as the DyT paper's LLaMA models do: the
  residual stream starts at std ``INIT_STD * sqrt(d_model)`` instead of ``INIT_STD``, the scale such a norm's
  defaults are chosen for (:func:`stream_std_at_init`).
- :class:`ScaledLearningRates`: ``lr_scales = {"alpha": 10.0}`` asks that a parameter of the norm learn at a multiple
  of the optimizer's learning rate; the trainer puts it in its own optimizer group (:func:`parameter_groups`).
  DyT's alpha does in ponder's language model: the residual stream grows 5-30x in a short, fast training and alpha
  must follow it (docs/norms.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class FoldableNorm(Protocol):
    """A norm whose output is ``core(x) * weight + bias`` over the last dimension."""

    def split_affine(self) -> tuple[nn.Module, Tensor, Tensor | None] | None:
        """``(core, weight [C], bias [C] or None)``, or None when this instance cannot be split (e.g. it is
        channels-first): it is then exported as it is."""


@runtime_checkable
class NeedsController(Protocol):
    """A norm that trains correctly only while a controller runs (e.g. ``"adyt"``)."""

    training_controller: str


INIT_STD = 0.02  # ponder's language model draws every embedding and linear weight from N(0, INIT_STD^2)


def stream_std_at_init(d_model: int) -> float:
    """The std of the residual stream that reaches a :class:`KeepsInputScale` norm in ponder's language model of
    width ``d_model`` at initialisation: scaled embeddings, ``INIT_STD * sqrt(d_model)``."""
    return INIT_STD * d_model ** 0.5


@runtime_checkable
class KeepsInputScale(Protocol):
    """A norm without statistics: its output keeps its input's scale (``tanh(alpha * x)`` for DyT)."""

    keeps_input_scale: bool


def wants_embedding_scale(norm: nn.Module) -> bool:
    """Whether a model whose norms are like ``norm`` should scale its token embeddings (see
    :class:`KeepsInputScale`)."""
    return isinstance(norm, KeepsInputScale) and bool(norm.keeps_input_scale)


@runtime_checkable
class ScaledLearningRates(Protocol):
    """A norm some of whose parameters learn at a multiple of the optimizer's learning rate."""

    lr_scales: Mapping[str, float]  # the parameter's name inside the norm (e.g. "alpha") -> multiple of the lr


def parameter_groups(model: nn.Module) -> list[dict[str, Any]]:
    """``model``'s trainable parameters as optimizer groups: the first at the optimizer's learning rate, then one per
    distinct :class:`ScaledLearningRates` multiple, marked ``{"params": [...], "lr_scale": s}`` (the trainer
    multiplies that group's learning rate by ``s`` once the optimizer is built). Parameters in a fixed order."""
    scale_of: dict[int, float] = {}
    for module in model.modules():
        if isinstance(module, ScaledLearningRates):
            for name, scale in module.lr_scales.items():
                param = getattr(module, name, None)
                if isinstance(param, nn.Parameter) and float(scale) != 1.0:
                    scale_of[id(param)] = float(scale)
    groups: dict[float, list[nn.Parameter]] = {1.0: []}
    for param in model.parameters():
        if param.requires_grad:
            groups.setdefault(scale_of.get(id(param), 1.0), []).append(param)
    return [{"params": groups.pop(1.0)}] + [{"params": ps, "lr_scale": s} for s, ps in groups.items()]


def required_controllers(model: nn.Module, listed: Iterable[str] = ()) -> list[str]:
    """The controllers ``model``'s norms need that ``listed`` (normalised names) lacks, in the order first met."""
    have = set(listed)
    out: list[str] = []
    for module in model.modules():
        if isinstance(module, NeedsController):
            name = module.training_controller
            if name not in have and name not in out:
                out.append(name)
    return out


@torch.no_grad()
def fold_into(norm: nn.Module, linear: nn.Linear) -> tuple[nn.Module, nn.Linear]:
    """``linear(core(x) * w + b) == linear'(core(x))`` with ``W' = W diag(w)``, ``c' = W b + c``: the pair
    ``(core, linear')`` for a :class:`FoldableNorm` that splits, else ``(norm, linear)`` unchanged."""
    parts = norm.split_affine() if isinstance(norm, FoldableNorm) else None
    if parts is None:
        return norm, linear
    core, weight, bias = parts
    if weight.dim() != 1 or weight.shape[0] != linear.in_features:
        return norm, linear
    folded = nn.Linear(linear.in_features, linear.out_features, bias=True,
                       device=linear.weight.device, dtype=linear.weight.dtype)
    folded.weight.copy_(linear.weight * weight[None, :])
    shift = linear.bias.clone() if linear.bias is not None else torch.zeros_like(folded.bias)
    if bias is not None:
        shift = shift + linear.weight @ bias
    folded.bias.copy_(shift)
    return core, folded


class ChannelsFirst(nn.Module):
    """Applies a last-dimension norm to channels-first features (``[N, C, ...]``): what a norm factory returns at
    position ``conv`` when its norm works over the last dimension."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)
