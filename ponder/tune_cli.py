"""``ponder tune``: its parser, its checks of the flags, and the table it prints. The tuning is in ponder.tune."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(commands: Any) -> None:
    """``ponder tune``'s parser (building it imports nothing heavy)."""
    tu = commands.add_parser("tune", help="tune ACT's threshold and lambda (Optuna grid or Pareto search)",
                             description="Grid search over act_threshold x act_lambda on Optuna, training a small "
                                         "PonderLM (shaped by --d-model, --n-layers, --seq-len) on --data. "
                                         "--mode sweep trains one model per lambda and evaluates every threshold "
                                         "on it; --mode full trains every cell. Several workers (processes or "
                                         "hosts) may share one --storage: each cell is computed by one of them, "
                                         "and each prints the whole table at the end.")
    tu.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.95, 0.99], metavar="T",
                    help="act_threshold values in (0, 1] to evaluate (default: 0.5 0.8 0.9 0.95 0.99)")
    tu.add_argument("--lambdas", type=float, nargs="+", default=[0.001, 0.005, 0.01, 0.05, 0.1], metavar="L",
                    help="act_lambda values >= 0, the ponder cost: higher trains shallower models "
                         "(default: 0.001 0.005 0.01 0.05 0.1)")
    tu.add_argument("--epochs", type=int, default=3, metavar="N",
                    help="passes over the training data per model (default: %(default)s)")
    tu.add_argument("--steps", type=int, metavar="N",
                    help="cap the optimizer steps of each training (default: no cap, --epochs decides)")
    tu.add_argument("--batch-size", type=int, default=32, metavar="N",
                    help="sequences per batch, in training and validation (default: %(default)s)")
    tu.add_argument("--score-metric", default="balanced", metavar="METRIC",
                    help="what picks the best configuration, lower is better: perplexity, layers, or balanced "
                         "(perplexity + 10 x layers executed) (default: %(default)s)")
    tu.add_argument("--data", metavar="PATH",
                    help="a WikiText-2 folder (word-level) or a UTF-8 text file (byte-level, split 90/5/5) "
                         "(default: the embedded corpus, byte-level)")
    tu.add_argument("--output-dir", default="results/act_tuning", metavar="DIR",
                    help="where act_tuning_results.json and the plots go (default: %(default)s)")
    tu.add_argument("--mode", default="sweep", help="sweep (one training per lambda, evaluated at every threshold) "
                                                    "or full (one training per cell) (default: %(default)s)")
    tu.add_argument("--search", default="grid", help="grid, or pareto (NSGA-II over [min, max] of the "
                                                    "thresholds and lambdas, objectives perplexity and layers) "
                                                    "(default: %(default)s)")
    tu.add_argument("--train-threshold", type=float, metavar="T",
                    help="sweep mode: the threshold each lambda's model trains at (default: the highest of "
                         "--thresholds)")
    tu.add_argument("--trials", type=int, default=20, metavar="N",
                    help="trials of --search pareto, all workers together (default: %(default)s)")
    tu.add_argument("--seeds", type=int, default=1, metavar="N",
                    help="repeat each configuration with random seeds 0..N-1 and report mean and spread "
                         "(default: %(default)s)")
    tu.add_argument("--storage", help="Optuna storage to resume from, e.g. sqlite:///tune.db or "
                                      "postgresql://user:password@host/db; several workers may share one "
                                      "(default: none, in memory)")
    tu.add_argument("--study-name", help="study name in --storage (default: ponder-act-grid or ponder-act-pareto)")
    tu.add_argument("--heartbeat", type=int, default=30, metavar="SECONDS",
                    help="with --storage: a worker beats every SECONDS for the cells it computes; a cell whose "
                         "worker is silent for 4 beats is redone by another worker (default: %(default)s)")
    tu.add_argument("--seq-len", type=int, default=128, metavar="N",
                    help="tokens per sequence, also the model's context (default: %(default)s)")
    tu.add_argument("--d-model", type=int, default=64, metavar="N",
                    help="the model's width; heads: d_model / 32 (at least 1), d_ff: 4 x d_model "
                         "(default: %(default)s)")
    tu.add_argument("--n-layers", type=int, default=4, metavar="N",
                    help="the model's layers, the most a token can run (default: %(default)s)")
    tu.add_argument("--eval-batches", type=int, metavar="N",
                    help="cap the validation batches per evaluation (default: the whole validation split)")
    tu.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    tu.add_argument("--no-progress", action="store_true", help="no progress bar (default: a progress bar)")
    tu.set_defaults(handler=_tune)


def _tune(args: argparse.Namespace) -> int:
    from ponder.errors import ConfigError

    for flag, choices in (("score_metric", ("perplexity", "layers", "balanced")), ("mode", ("sweep", "full")),
                          ("search", ("grid", "pareto"))):
        if getattr(args, flag) not in choices:
            raise ConfigError(f"unknown --{flag.replace('_', '-')} {getattr(args, flag)!r}; "
                              f"choose from {', '.join(choices)}")
    for t in args.thresholds + ([args.train_threshold] if args.train_threshold is not None else []):
        if not 0.0 < t <= 1.0:
            raise ConfigError(f"--thresholds: {t} is outside (0, 1]")
    for lam in args.lambdas:
        if not lam >= 0.0:
            raise ConfigError(f"--lambdas: {lam} is negative")
    for flag in ("epochs", "steps", "batch_size", "trials", "seeds", "seq_len", "d_model", "n_layers",
                 "eval_batches", "heartbeat"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    from ponder.tune import run_act_hyperparameter_tuning

    r = run_act_hyperparameter_tuning(
        args.data, args.batch_size, args.epochs, args.output_dir, threshold_values=args.thresholds,
        lambda_values=args.lambdas, score_metric=args.score_metric, mode=args.mode, search=args.search,
        n_trials=args.trials, seeds=args.seeds, storage=args.storage, study_name=args.study_name,
        d_model=args.d_model, n_layers=args.n_layers, n_seq=args.seq_len, max_steps=args.steps,
        max_eval_batches=args.eval_batches, device=args.device, progress=not args.no_progress,
        train_threshold=args.train_threshold, heartbeat_interval=args.heartbeat)
    print(format_table(r))
    print(f"best: threshold {r['best_config']['threshold']:g}, lambda {r['best_config']['lambda']:g} "
          f"({r['score_metric']} score {r['best_score']:.3f}); {r['n_trainings']} trainings, "
          f"{r['resumed_trials']} trials resumed, {r['cells_computed_here']} computed here")
    print(f"wrote {args.output_dir}/act_tuning_results.json and plots", file=sys.stderr)
    return 0


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
