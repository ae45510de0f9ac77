"""Replace the normalisation layers of any torch model with a registered norm plugin.

``convert(model, to="dyt", source=("layernorm", "batchnorm"), **params)`` swaps LayerNorm,
BatchNorm (1d/2d/3d) and RMSNorm layers in place and returns how many it replaced. Channels-last
norms (LayerNorm, RMSNorm) become the plugin at position ``attn``; BatchNorm, whose channels are
dimension 1, becomes it at position ``conv``. Output shapes do not change.

Replacing BatchNorm is allowed but known to cost accuracy: the DyT paper reports ResNet-50 on
ImageNet falling from 76.2 to 68.9 top-1, and seed 001 needed ``alpha_init_value=1.0`` there.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

SOURCES = ("layernorm", "batchnorm", "rmsnorm")


def _source_of(module: nn.Module) -> tuple[str, int] | None:
    """The source kind of a norm layer and its channel count, or None if it is not one we replace."""
    from ponder.plugins.norm.basic import RMSNorm

    if isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            warnings.warn(f"skipping {module}: only LayerNorm over the last dimension can be converted",
                          stacklevel=3)
            return None
        return "layernorm", module.normalized_shape[0]
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batchnorm", module.num_features
    rms_types = (RMSNorm, nn.RMSNorm) if hasattr(nn, "RMSNorm") else (RMSNorm,)
    if isinstance(module, rms_types):
        shape = getattr(module, "normalized_shape", None) or (module.weight.shape[0],)
        return "rmsnorm", shape[0]
    if type(module).__name__.endswith(("RMSNorm", "LlamaRMSNorm")) and getattr(module, "weight", None) is not None:
        return "rmsnorm", module.weight.shape[0]
    return None


def _replacement(module: nn.Module, to: str, sources: tuple[str, ...], params: dict[str, Any]) -> nn.Module | None:
    from ponder import registry

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
    return new.train(module.training)


def convert(model: nn.Module, to: str = "dyt", source: tuple[str, ...] | str = ("layernorm", "batchnorm"),
            **params: Any) -> int:
    """Replace norm layers of ``model`` in place with the norm plugin ``to``; returns how many were replaced.

    ``source`` names what to replace: any of ``layernorm``, ``batchnorm``, ``rmsnorm``. ``params``
    are the plugin's settings, checked before anything changes. A model that is itself a norm layer
    cannot be replaced in place: use :func:`convert_module`.
    """
    from ponder import registry

    sources = (source,) if isinstance(source, str) else tuple(source)
    bad = [s for s in sources if s not in SOURCES]
    if bad:
        raise ValueError(f"unknown source {bad[0]!r}; valid sources: {', '.join(SOURCES)}")
    registry.validate("norm", to, params)
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = _replacement(child, to, sources, params)
            if new is not None:
                setattr(parent, name, new)
                count += 1
    return count


def convert_module(module: nn.Module, to: str = "dyt", source: tuple[str, ...] | str = ("layernorm",),
                   **params: Any) -> nn.Module:
    """Like :func:`convert`, but returns the converted module (which may be a new one when
    ``module`` is itself a norm layer), as the seeds' ``convert_ln_to_*`` helpers do."""
    sources = (source,) if isinstance(source, str) else tuple(source)
    convert(module, to, sources, **params)
    new = _replacement(module, to, sources, params)
    return new if new is not None else module
