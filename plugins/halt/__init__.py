"""Built-in halting plugins (plugin name ``ponder.halt``): ACT, PonderNet, and fixed depth."""

from ponder.registry.hookspecs import hookimpl


@hookimpl
def register_halting(register):
    register("act", "ponder.plugins.halt.rules:ACT",
             description="Graves' Adaptive Computation Time: halt at cumulative probability >= threshold, ponder cost")
    register("pondernet", "ponder.plugins.halt.rules:PonderNet",
             description="PonderNet: geometric-prior KL, expected per-layer loss, deterministic threshold at inference")
    register("fixed", "ponder.plugins.halt.rules:FixedDepth",
             description="Every layer, no halting: the full-depth baseline")
