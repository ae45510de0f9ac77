"""Built-in norm plugins (plugin name ``ponder.norm``)."""

from ponder.registry.hookspecs import hookimpl


@hookimpl
def register_norms(register):
    register("layernorm", "ponder.plugins.norm.basic:layer_norm",
             description="Layer normalisation over the feature dimension (torch.nn.LayerNorm)")
    register("rmsnorm", "ponder.plugins.norm.basic:rms_norm",
             description="Root-mean-square normalisation with a learned scale, no centring")
