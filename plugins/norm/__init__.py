"""Built-in norm plugins (plugin name ``ponder.norm``)."""

from ponder.registry.hookspecs import hookimpl

_LAZY = {
    "DynamicTanh": "dyt", "AdaptiveDynamicTanh": "dyt", "update_adyt_grad_norms": "dyt", "RMSNorm": "basic",
}


def __getattr__(name: str):  # the classes import torch: load them on first use only
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl
def register_norms(register):
    register("layernorm", "ponder.plugins.norm.basic:layer_norm",
             description="Layer normalisation over the feature dimension (torch.nn.LayerNorm)")
    register("rmsnorm", "ponder.plugins.norm.basic:rms_norm",
             description="Root-mean-square normalisation with a learned scale, no centring")
    register("dyt", "ponder.plugins.norm.dyt:dyt",
             description="Dynamic Tanh: weight * tanh(alpha * x) + bias, no statistics")
    register("adyt", "ponder.plugins.norm.dyt:adyt",
             description="Adaptive DyT: alpha follows the layer's smoothed gradient norm (needs the adyt controller)")
