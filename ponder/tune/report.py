"""What a tuning is asked and what it reports, torch-free (``ponder tune --help`` and the table read it from here):
the defaults and checks of a grid, the scores, the Pareto front, one configuration's summary and the printed table.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

from ponder.errors import ConfigError
from ponder.limits import TUNE_LAMBDAS, TUNE_MODES, TUNE_SCORES, TUNE_SEARCHES, TUNE_THRESHOLDS, check_threshold

DEFAULT_THRESHOLDS = TUNE_THRESHOLDS
DEFAULT_LAMBDAS = TUNE_LAMBDAS
MODES = TUNE_MODES
SEARCHES = TUNE_SEARCHES

# What a tuning trains when no run config is given (a run config brings its own model and batches).
DEFAULT_EPOCHS = 3
DEFAULT_BATCH_SIZE = 32
DEFAULT_SEQ_LEN = 128
DEFAULT_D_MODEL = 64
DEFAULT_N_LAYERS = 4
DEFAULT_TRIALS = 20
DEFAULT_OUTPUT_DIR = "results/act_tuning"

_SCORES: dict[str, Callable[[dict[str, Any]], float]] = {
    "perplexity": lambda r: r["final_val_perplexity"],
    "layers": lambda r: r["avg_layers_executed"],
    "balanced": lambda r: r["final_val_perplexity"] + 10.0 * r["avg_layers_executed"],
}
SCORE_METRICS = {name: _SCORES[name] for name in TUNE_SCORES}  # in the order ponder.limits lists them

CONVERGENCE_SPEED = "validation perplexity drop per epoch: (untrained perplexity - final perplexity) / epochs trained"
TRAINING_TIME = ("seconds of the training behind a result; in sweep mode one training per lambda is shared by "
                 "training_time_shared_by thresholds")


def check_choice(value: str, choices: Sequence[str], what: str) -> str:
    """``value`` if it is one of ``choices``, else a ConfigError naming ``what`` and the choices."""
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; choose from {', '.join(choices)}")
    return value


def resolve_score(score_metric: str | Callable[[dict[str, Any]], float]) -> tuple[str, Callable]:
    """``(name, function)`` of a score: one of SCORE_METRICS, or any callable ``result -> float`` (lower is better)."""
    if callable(score_metric):
        return getattr(score_metric, "__name__", "custom"), score_metric
    if score_metric not in SCORE_METRICS:
        raise ConfigError(f"unknown score metric {score_metric!r}; choose from {', '.join(SCORE_METRICS)} "
                          "or pass a callable")
    return score_metric, SCORE_METRICS[score_metric]


def check_lambda(value: float, what: str = "lambda") -> float:
    if not value >= 0.0:  # NaN too
        raise ConfigError(f"{what} {value} is negative; the ponder cost weight must be >= 0")
    return float(value)


def check_grid(thresholds: Sequence[float], lambdas: Sequence[float], num_epochs: int) -> None:
    """At least one threshold (each in (0, 1]) and one lambda (each >= 0), and at least one epoch."""
    if not thresholds or not lambdas:
        raise ConfigError("give at least one threshold and one lambda")
    for t in thresholds:
        check_threshold(t, "threshold")
    for lam in lambdas:
        check_lambda(lam)
    if num_epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {num_epochs}")


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (both minimised), by the first."""
    front = [i for i, (a, b) in enumerate(points)
             if not any((c <= a and d <= b) and (c < a or d < b) for c, d in points)]
    return sorted(front, key=lambda i: points[i])


def summarise(threshold: float, lam: float, runs: list[dict[str, Any]], shared_by: int,
              n_layers: int) -> dict[str, Any]:
    """One configuration's result from its runs (one per seed): the means, and with several seeds the spread."""
    def mean(key):
        return statistics.fmean(r[key] for r in runs)

    r: dict[str, Any] = {
        "threshold": threshold, "lambda": lam,
        "final_val_perplexity": mean("perplexity"), "avg_layers_executed": mean("avg_layers_executed"),
        "mean_token_depth": mean("mean_token_depth"), "training_time": mean("training_time"),
        "training_time_shared_by": shared_by, "eval_time": mean("eval_time"),
        "convergence_speed": mean("convergence_speed"), "steps": runs[0]["steps"], "epochs": runs[0]["epochs"],
    }
    r["speedup_potential"] = n_layers / r["avg_layers_executed"]
    if len(runs) > 1:
        r["seeds"] = len(runs)
        r["final_val_perplexity_std"] = statistics.stdev(x["perplexity"] for x in runs)
        r["avg_layers_executed_std"] = statistics.stdev(x["avg_layers_executed"] for x in runs)
        r["mean_token_depth_std"] = statistics.stdev(x["mean_token_depth"] for x in runs)
    return r


def format_table(report: dict[str, Any]) -> str:
    """The table ``ponder tune`` prints: a header with the model's shape and the data, a row per configuration
    (by lambda, then threshold), and a line saying what the columns are."""
    n_layers = report.get("n_layers")
    shape = report.get("model") or {"n_layers": n_layers}
    model = ", ".join(f"{key} {value}" for key, value in shape.items())
    lines = [f"model: {model}; data: {report.get('data', 'not recorded')}; score: {report.get('score_metric')} "
             "(lower is better)"]
    head = ("threshold", "lambda", "perplexity", "layers executed", "mean token depth", "speed-up", "score")
    lines.append("  ".join(f"{h:>{max(len(h), 9)}}" for h in head))
    for x in sorted(report["all_results"], key=lambda x: (x["lambda"], x["threshold"])):
        depth = x.get("mean_token_depth", float("nan"))
        cells = (f"{x['threshold']:g}", f"{x['lambda']:g}", f"{x['final_val_perplexity']:.3f}",
                 f"{x['avg_layers_executed']:.2f}", f"{depth:.2f}", f"{x['speedup_potential']:.2f}x",
                 f"{x['score']:.3f}")
        lines.append("  ".join(f"{c:>{max(len(h), 9)}}" for c, h in zip(cells, head, strict=True)))
    of = f" (of {n_layers})" if n_layers else ""
    lines.append(f"layers executed{of}: per validation batch, its deepest token's depth, averaged; mean token depth: "
                 "layers per token; speed-up: n_layers / layers executed")
    return "\n".join(lines)
