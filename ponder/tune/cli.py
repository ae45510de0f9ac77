"""``ponder tune``: its parser and its checks of the flags (torch-free: building ``ponder --help`` imports neither
torch nor optuna). The defaults and choices come from ``ponder.limits`` and ``ponder.tune.report``; the tuning is
``ponder.tune.run_act_hyperparameter_tuning``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ponder.limits import TUNE_LAMBDAS, TUNE_MODES, TUNE_SCORES, TUNE_SEARCHES, TUNE_THRESHOLDS, check_threshold
from ponder.tune.claims import HEARTBEAT_INTERVAL
from ponder.tune.report import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_D_MODEL,
    DEFAULT_EPOCHS,
    DEFAULT_N_LAYERS,
    DEFAULT_OUTPUT_DIR,
    DEFAULT_SEQ_LEN,
    DEFAULT_TRIALS,
    check_choice,
    check_lambda,
    format_table,
)


def _listed(values: tuple) -> str:
    return " ".join(f"{v:g}" for v in values)


def add_parser(commands: Any) -> None:
    """``ponder tune``'s parser (building it imports nothing heavy)."""
    tu = commands.add_parser("tune", help="tune ACT's threshold and lambda (Optuna grid or Pareto search)",
                             description="Grid search over act_threshold x act_lambda on Optuna. Each training is "
                                         "a `ponder train` run (the same Trainer, controllers and optimizer "
                                         "plugin): of a small PonderLM shaped by --d-model, --n-layers and "
                                         "--seq-len, or of your own run config (--config), on --data. --mode "
                                         "sweep trains one model per lambda and evaluates every threshold on it; "
                                         "--mode full trains every cell. Several workers (processes or hosts) may "
                                         "share one --storage: each cell is computed by one of them, and each "
                                         "prints the whole table at the end.")
    tu.add_argument("--config", metavar="RUN.TOML",
                    help="tune this run config as `ponder train --config` trains it (model, norm, optimizer, "
                         "controllers, train settings); per cell only [halting] act_lambda, model.act_threshold and "
                         "train.steps change (default: none, a model shaped by --d-model, --n-layers, --seq-len)")
    tu.add_argument("--thresholds", type=float, nargs="+", default=list(TUNE_THRESHOLDS), metavar="T",
                    help=f"act_threshold values in (0, 1] to evaluate (default: {_listed(TUNE_THRESHOLDS)})")
    tu.add_argument("--lambdas", type=float, nargs="+", default=list(TUNE_LAMBDAS), metavar="L",
                    help="act_lambda values >= 0, the ponder cost: higher trains shallower models "
                         f"(default: {_listed(TUNE_LAMBDAS)})")
    tu.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, metavar="N",
                    help="passes over the training data per model (default: %(default)s)")
    tu.add_argument("--steps", type=int, metavar="N",
                    help="cap the optimizer steps of each training (default: no cap, --epochs decides)")
    tu.add_argument("--batch-size", type=int, metavar="N",
                    help="sequences per batch, in training and validation; with --config, the run's "
                         f"train.batch_size (default: {DEFAULT_BATCH_SIZE})")
    tu.add_argument("--score-metric", default="balanced", metavar="METRIC",
                    help="what picks the best configuration, lower is better: perplexity, layers, or balanced "
                         "(perplexity + 10 x layers executed) (default: %(default)s)")
    tu.add_argument("--data", metavar="PATH",
                    help="a WikiText-2 folder (word-level) or a UTF-8 text file (byte-level, split 90/5/5) "
                         "(default: the embedded corpus, byte-level; with --config, the run's [data])")
    tu.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, metavar="DIR",
                    help="where act_tuning_results.json and the plots go (default: %(default)s)")
    tu.add_argument("--mode", default=TUNE_MODES[0],
                    help="sweep (one training per lambda, evaluated at every threshold) or full (one training per "
                         "cell) (default: %(default)s)")
    tu.add_argument("--search", default=TUNE_SEARCHES[0],
                    help="grid, or pareto (NSGA-II over [min, max] of the thresholds and lambdas, objectives "
                         "perplexity and layers) (default: %(default)s)")
    tu.add_argument("--train-threshold", type=float, metavar="T",
                    help="sweep mode: the threshold each lambda's model trains at (default: the highest of "
                         "--thresholds)")
    tu.add_argument("--trials", type=int, default=DEFAULT_TRIALS, metavar="N",
                    help="trials of --search pareto, all workers together (default: %(default)s)")
    tu.add_argument("--seeds", type=int, default=1, metavar="N",
                    help="repeat each configuration with random seeds 0..N-1 (with --config: the run's "
                         "train.seed + 0..N-1) and report mean and spread (default: %(default)s)")
    tu.add_argument("--storage", help="Optuna storage to resume from, e.g. sqlite:///tune.db or "
                                      "postgresql://user:password@host/db; several workers may share one "
                                      "(default: none, in memory)")
    tu.add_argument("--study-name", help="study name in --storage (default: ponder-act-grid or ponder-act-pareto)")
    tu.add_argument("--heartbeat", type=int, default=HEARTBEAT_INTERVAL, metavar="SECONDS",
                    help="with --storage: a worker beats every SECONDS for the cells it computes; a cell whose "
                         "worker is silent for 4 beats is redone by another worker (default: %(default)s)")
    tu.add_argument("--seq-len", type=int, metavar="N",
                    help="tokens per sequence, also the model's context; with --config, the run's train.seq_len "
                         f"(default: {DEFAULT_SEQ_LEN})")
    tu.add_argument("--d-model", type=int, metavar="N",
                    help="the model's width; heads: d_model / 32 (at least 1), d_ff: 4 x d_model; not with "
                         f"--config (default: {DEFAULT_D_MODEL})")
    tu.add_argument("--n-layers", type=int, metavar="N",
                    help=f"the model's layers, the most a token can run; not with --config (default: "
                         f"{DEFAULT_N_LAYERS})")
    tu.add_argument("--eval-batches", type=int, metavar="N",
                    help="cap the validation batches per evaluation (default: the whole validation split)")
    tu.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    tu.add_argument("--no-progress", action="store_true", help="no progress bar (default: a progress bar)")
    tu.set_defaults(handler=_tune)


def check_args(args: argparse.Namespace) -> None:
    """Every flag checked before anything heavy is imported; a ConfigError naming the flag."""
    from ponder.errors import ConfigError

    for flag, choices in (("score_metric", TUNE_SCORES), ("mode", TUNE_MODES), ("search", TUNE_SEARCHES)):
        check_choice(getattr(args, flag), choices, f"--{flag.replace('_', '-')}")
    for t in args.thresholds:
        check_threshold(t, "--thresholds")
    if args.train_threshold is not None:
        check_threshold(args.train_threshold, "--train-threshold")
    for lam in args.lambdas:
        check_lambda(lam, "--lambdas:")
    for flag in ("epochs", "steps", "batch_size", "trials", "seeds", "seq_len", "d_model", "n_layers",
                 "eval_batches", "heartbeat"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.config and (args.d_model is not None or args.n_layers is not None):
        raise ConfigError("--d-model and --n-layers shape the tuner's own model; with --config the run's [model] "
                          "is tuned as it is: leave them out")


def _tune(args: argparse.Namespace) -> int:
    check_args(args)
    run = None
    if args.config:
        from ponder.config import load_config

        run = load_config(args.config)
    from ponder.tune import run_act_hyperparameter_tuning

    r = run_act_hyperparameter_tuning(
        args.data, args.batch_size, args.epochs, args.output_dir, threshold_values=args.thresholds,
        lambda_values=args.lambdas, score_metric=args.score_metric, mode=args.mode, search=args.search,
        n_trials=args.trials, seeds=args.seeds, storage=args.storage, study_name=args.study_name,
        d_model=args.d_model, n_layers=args.n_layers, n_seq=args.seq_len, max_steps=args.steps,
        max_eval_batches=args.eval_batches, device=args.device, progress=not args.no_progress,
        train_threshold=args.train_threshold, heartbeat_interval=args.heartbeat, run=run)
    print(format_table(r))
    print(f"best: threshold {r['best_config']['threshold']:g}, lambda {r['best_config']['lambda']:g} "
          f"({r['score_metric']} score {r['best_score']:.3f}); {r['n_trainings']} trainings, "
          f"{r['resumed_trials']} trials resumed, {r['cells_computed_here']} computed here")
    print(f"wrote {args.output_dir}/act_tuning_results.json and plots", file=sys.stderr)
    return 0
