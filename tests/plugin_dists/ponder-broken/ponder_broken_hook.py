"""Registers one norm, then its hook raises: nothing it registered may be kept."""

from ponder import hookimpl


@hookimpl
def register_norms(register):
    register("halfnorm", "torch.nn:LayerNorm")
    raise RuntimeError("halfnorm's config file is missing")
