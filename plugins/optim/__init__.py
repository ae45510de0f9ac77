"""Built-in optimizer plugins (plugin name ``ponder.optim``): torch's own, with their defaults, and DAG."""

from ponder.registry.hookspecs import hookimpl

_LAZY = {"DAG": "dag", "cosine_k_schedule": "dag"}


def __getattr__(name: str):  # DAG imports torch: load it on first use only
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl
def register_optimizers(register):
    register("sgd", "torch.optim:SGD", description="Stochastic gradient descent, optional momentum (torch)")
    register("adam", "torch.optim:Adam", description="Adam (torch)")
    register("adamw", "torch.optim:AdamW", description="Adam with decoupled weight decay (torch)")
    register("dag", "ponder.plugins.optim.dag:DAG",
             description="Dynamic-Alpha Gradient: tanh-bounded update, per-tensor alpha control, global RMS shrink")
