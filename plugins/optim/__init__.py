"""Built-in optimizer plugins (plugin name ``ponder.optim``): torch's own, with their defaults."""

from ponder.registry.hookspecs import hookimpl


@hookimpl
def register_optimizers(register):
    register("sgd", "torch.optim:SGD", description="Stochastic gradient descent, optional momentum (torch)")
    register("adam", "torch.optim:Adam", description="Adam (torch)")
    register("adamw", "torch.optim:AdamW", description="Adam with decoupled weight decay (torch)")
