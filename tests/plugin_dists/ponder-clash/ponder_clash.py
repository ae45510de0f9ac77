"""Registers ``Layer_Norm``, which normalises to the built-in ``layernorm``."""

from ponder import hookimpl


@hookimpl
def register_norms(register):
    register("Layer_Norm", "torch.nn:LayerNorm", description="another layer norm")
