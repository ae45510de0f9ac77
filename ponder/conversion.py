"""Replace the normalisation layers of any torch model with a registered norm plugin.

``convert(model, to="dyt", source=("layernorm", "batchnorm"), **params)`` swaps LayerNorm,
BatchNorm (1d/2d/3d) and RMSNorm layers in place and returns how many it replaced. Channels-last
norms (LayerNorm, RMSNorm) become the plugin at position ``attn``; BatchNorm, whose channels are
dimension 1, becomes it at position ``conv``. Output shapes do not change.

Replacing BatchNorm is allowed but known to cost accuracy: the DyT paper reports ResNet-50 on
ImageNet falling from 76.2 to 68.9 top-1, and the default alpha 0.5 did not work in place of BatchNorm
where ``alpha_init_value=1.0`` did (``examples/digits_dyt.py``).

RMSNorm is recognised as torch's and ponder's own class, and as any other class whose name ends in
``RMSNorm`` with a 1-d ``weight`` and an ``eps`` or ``variance_epsilon`` (Hugging Face's ``LlamaRMSNorm``
and its many copies). With ``keep_affine=True`` (the default) the old layer's ``weight`` and ``bias``
are copied into the new norm where it has a parameter of that name and shape, so a trained model keeps
its learned gains and shifts (a freshly built one has ones and zeros either way). The gain of an RMSNorm
class we only know by name is copied only when the layer's output for an all-ones input (RMS 1) is its
``weight``; Gemma's RMSNorm, which scales by ``1 + weight``, fails that check and keeps the new norm's
initial gain, with a warning.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ponder import registry
from ponder.contracts.norms import ChannelsFirst

SOURCES = ("layernorm", "batchnorm", "rmsnorm")


def _source_of(module: nn.Module) -> tuple[str, int] | None:
    """The source kind of a norm layer and its channel count, or None if it is not one we replace."""
    if isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            warnings.warn(f"skipping {module}: only LayerNorm over the last dimension can be converted",
                          stacklevel=3)
            return None
        return "layernorm", module.normalized_shape[0]
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batchnorm", module.num_features
    if hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm):
        shape = module.normalized_shape or (module.weight.shape[0],)
        return "rmsnorm", shape[0]
    if _named_rms_norm(module):
        shape = getattr(module, "normalized_shape", None)
        return "rmsnorm", shape[0] if shape else module.weight.shape[0]
    return None


def _named_rms_norm(module: nn.Module) -> bool:
    """An RMSNorm known by its class name (ponder's own, transformers' ``LlamaRMSNorm`` and its copies): an
    epsilon and either a 1-d ``weight`` or a one-entry ``normalized_shape``, under a name ending in ``RMSNorm``."""
    weight = getattr(module, "weight", None)
    shape = getattr(module, "normalized_shape", None)
    sized = (isinstance(weight, torch.Tensor) and weight.dim() == 1) or (
        weight is None and isinstance(shape, tuple) and len(shape) == 1)
    return (type(module).__name__.endswith("RMSNorm") and sized
            and any(isinstance(getattr(module, eps, None), float) for eps in ("eps", "variance_epsilon")))


@torch.no_grad()
def _gain_is_weight(module: nn.Module) -> bool:
    """Whether an RMSNorm known only by name scales by its ``weight`` (LLaMA) rather than, say,
    ``1 + weight`` (Gemma): its output for an all-ones input, whose RMS is 1, must be the weight."""
    weight = module.weight
    if weight is None:  # no gain to carry
        return True
    try:
        out = module(torch.ones_like(weight).unsqueeze(0))
    except Exception:  # a forward we cannot probe is one we do not trust
        return False
    if isinstance(out, tuple):
        out = out[0]
    return isinstance(out, torch.Tensor) and out.shape[-1] == weight.shape[0] and torch.allclose(
        out.reshape(-1, weight.shape[0])[0].float(), weight.float(), rtol=1e-3, atol=1e-6)


@torch.no_grad()
def _carry_affine(old: nn.Module, new: nn.Module) -> None:
    """Copy ``weight`` and ``bias`` from the old norm into the new one where names and shapes match."""
    target = new.norm if isinstance(new, ChannelsFirst) else new
    if _named_rms_norm(old) and not _gain_is_weight(old):
        warnings.warn(f"{type(old).__name__}: its gain is not its weight (e.g. 1 + weight), so the learned gain "
                      "was not carried into the new norm", stacklevel=4)
        return
    for name in ("weight", "bias"):
        src, dst = getattr(old, name, None), getattr(target, name, None)
        if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.shape == dst.shape:
            dst.copy_(src)


def _replacement(module: nn.Module, to: str, sources: tuple[str, ...], params: dict[str, Any],
                 keep_affine: bool = False) -> nn.Module | None:
    found = _source_of(module)
    if found is None or found[0] not in sources:
        return None
    kind, channels = found
    position = "conv" if kind == "batchnorm" else "attn"
    new = registry.create("norm", to, channels, position=position, **params)
    ref = next(module.parameters(), None)
    if ref is None:
        ref = next(module.buffers(), None)
    if ref is not None and ref.is_floating_point():
        new = new.to(device=ref.device, dtype=ref.dtype)
    if keep_affine:
        _carry_affine(module, new)
    return new.train(module.training)


def convert(model: nn.Module, to: str = "dyt", source: tuple[str, ...] | str = ("layernorm", "batchnorm"),
            *, keep_affine: bool = True, **params: Any) -> int:
    """Replace norm layers of ``model`` in place with the norm plugin ``to``; returns how many were replaced.

    ``source`` names what to replace: any of ``layernorm``, ``batchnorm``, ``rmsnorm``. ``params``
    are the plugin's settings, checked before anything changes. ``keep_affine`` copies each old
    layer's ``weight`` and ``bias`` into its replacement where names and shapes match. A model that
    is itself a norm layer cannot be replaced in place: use :func:`convert_module`.
    """
    sources = (source,) if isinstance(source, str) else tuple(source)
    bad = [s for s in sources if s not in SOURCES]
    if bad:
        raise ValueError(f"unknown source {bad[0]!r}; valid sources: {', '.join(SOURCES)}")
    registry.validate("norm", to, params)
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = _replacement(child, to, sources, params, keep_affine)
            if new is not None:
                setattr(parent, name, new)
                count += 1
    return count


def convert_module(module: nn.Module, to: str = "dyt", source: tuple[str, ...] | str = ("layernorm",),
                   *, keep_affine: bool = True, **params: Any) -> nn.Module:
    """Like :func:`convert`, but returns the converted module (which may be a new one when
    ``module`` is itself a norm layer), as the ``convert_ln_to_*`` helpers do."""
    sources = (source,) if isinstance(source, str) else tuple(source)
    convert(module, to, sources, keep_affine=keep_affine, **params)
    new = _replacement(module, to, sources, params, keep_affine)
    return new if new is not None else module


def convert_ln_to_dyt(module: nn.Module, alpha_init_value: float = 0.5) -> nn.Module:
    """Replace every LayerNorm in ``module`` with DynamicTanh; returns the module (the DyT reference's helper)."""
    return convert_module(module, to="dyt", source=("layernorm",), alpha_init_value=alpha_init_value)


def convert_ln_to_adyt(module: nn.Module, lambda_factor: float = 0.1, smooth_factor: float = 0.99,
                       alpha_min: float = 0.1, alpha_max: float = 2.0, alpha_init_value: float = 0.5) -> nn.Module:
    """Replace every LayerNorm in ``module`` with AdaptiveDynamicTanh; returns the module (the ADyT
    reference's helper)."""
    return convert_module(module, to="adyt", source=("layernorm",), lambda_factor=lambda_factor,
                          smooth_factor=smooth_factor, alpha_min=alpha_min, alpha_max=alpha_max,
                          alpha_init_value=alpha_init_value)
