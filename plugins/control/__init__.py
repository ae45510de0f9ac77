"""Built-in controller plugins (plugin name ``ponder.control``)."""

from ponder.registry.hookspecs import hookimpl


@hookimpl
def register_controllers(register):
    register("adyt", "ponder.plugins.control.adyt:ADyTController",
             description="Updates ADyT layers' smoothed gradient norms after backward, before the optimizer step")
    register("autonomic", "ponder.plugins.control.autonomic:Autonomic",
             description="Loss-driven dials: RoPE base and attention window follow the loss's EWMA")
    register("warmup-cosine", "ponder.plugins.control.schedules:WarmupCosine",
             description="Learning rate: linear warm-up, then cosine decay (torch LambdaLR)")
    register("step", "ponder.plugins.control.schedules:StepDecay",
             description="Learning rate: multiply by gamma every step_size steps (torch StepLR)")
