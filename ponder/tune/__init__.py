"""The ACT hyperparameter tuner on Optuna: ``act_threshold`` × ``act_lambda``.

Every training is a ``ponder train`` run: its run config is parsed as ``ponder train`` parses a TOML file (or is
the user's own run config, ``run=`` / ``ponder tune --config``, with only act_lambda, act_threshold and the step
count changed per cell), trained in memory by :class:`ponder.train.Trainer` (controllers, optimizer plugin and
epoch order included) and measured by :func:`ponder.evaluate.evaluate`.

``act_threshold`` acts only at inference, so ``mode="sweep"`` (the default) trains ONE model per lambda
and evaluates it at every threshold: a grid of T thresholds × L lambdas costs L trainings, not T × L.
``mode="full"`` trains every cell. Every cell is its own Optuna trial; with a storage
(``sqlite:///tune.db``) an interrupted tuning resumes and skips every cell whose trial is COMPLETE, and
several workers may share the storage: each cell is claimed (a RUNNING trial, the lowest number wins)
before it is computed, so every cell is computed once, and a dead worker's claims expire by heartbeat.

Per configuration the results hold ``final_val_perplexity``, ``avg_layers_executed`` (the layers each
validation batch actually ran, i.e. its deepest token, averaged over batches: a layer count in
``[1, n_layers]``, never a sum of halting weights), ``mean_token_depth``, ``training_time`` (seconds;
in sweep mode the lambda's one training, shared by all its thresholds: see ``training_time_shared_by``),
``convergence_speed`` (validation perplexity drop per epoch: (perplexity of the untrained model −
final perplexity) / epochs trained, epochs fractional when steps are capped), ``speedup_potential``
(``n_layers / avg_layers_executed``) and ``score`` (lower is better).

The modules: ``report`` (torch-free: defaults, checks, scores, Pareto front, the table), ``loaders`` (the data),
``tuner`` (ACTHyperparameterTuner, run_act_hyperparameter_tuning), ``search`` (the Optuna searches), ``claims``
(shared storages), ``plots`` and ``cli`` (``ponder tune``'s parser, torch-free). Importing this package stays
torch-free; the tuner loads on first use.
"""

from ponder.tune.report import (
    CONVERGENCE_SPEED,
    DEFAULT_LAMBDAS,
    DEFAULT_THRESHOLDS,
    MODES,
    SCORE_METRICS,
    SEARCHES,
    check_grid,
    format_table,
    pareto_front,
    resolve_score,
)

_LAZY = {
    "ACTHyperparameterTuner": "ponder.tune.tuner",
    "run_act_hyperparameter_tuning": "ponder.tune.tuner",
    "make_loaders": "ponder.tune.loaders",
    "describe_data": "ponder.tune.loaders",
}

__all__ = ["ACTHyperparameterTuner", "CONVERGENCE_SPEED", "DEFAULT_LAMBDAS", "DEFAULT_THRESHOLDS", "MODES",
           "SCORE_METRICS", "SEARCHES", "check_grid", "describe_data", "format_table", "make_loaders", "pareto_front",
           "resolve_score", "run_act_hyperparameter_tuning"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ponder.tune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
