"""ponder: adaptive-depth transformers built from plugins, exported with in-graph early exit, served over gRPC."""

__version__ = "0.1.0"

from ponder.registry.hookspecs import hookimpl, hookspec  # noqa: E402  (cheap: pluggy only, no torch)

__all__ = ["__version__", "hookimpl", "hookspec", "convert", "DynamicTanh", "AdaptiveDynamicTanh",
           "convert_ln_to_dyt", "convert_ln_to_adyt", "update_adyt_grad_norms",
           "ACTHyperparameterTuner", "run_act_hyperparameter_tuning"]

# Heavier parts load on first use, so that `import ponder` and the CLI's --help stay torch-free.
_LAZY = {
    "convert": "ponder.conversion",
    "DynamicTanh": "ponder.plugins.norm.dyt",
    "AdaptiveDynamicTanh": "ponder.plugins.norm.dyt",
    "convert_ln_to_dyt": "ponder.conversion",
    "convert_ln_to_adyt": "ponder.conversion",
    "update_adyt_grad_norms": "ponder.plugins.norm.dyt",
    "ACTHyperparameterTuner": "ponder.tune",
    "run_act_hyperparameter_tuning": "ponder.tune",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ponder' has no attribute {name!r}")
