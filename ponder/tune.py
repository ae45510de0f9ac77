"""The ACT hyperparameter tuner on Optuna: ``act_threshold`` × ``act_lambda``.

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
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ponder.config import DataConfig, ModelConfig, PluginSpec
from ponder.data import TokenChunks, prepare_data
from ponder.errors import ConfigError, DataError
from ponder.model import PonderLM
from ponder.tune_claims import (
    HEARTBEAT_INTERVAL,
    Heartbeat,
    cell_of,
    create_claim,
    experimental_ok,
    fail_stale_claims,
    holds_cell,
    open_storage,
    quiet_optuna,
    resolve_claims,
)

DEFAULT_THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.99)
DEFAULT_LAMBDAS = (0.001, 0.005, 0.01, 0.05, 0.1)
SCORE_METRICS: dict[str, Callable[[dict[str, Any]], float]] = {
    "perplexity": lambda r: r["final_val_perplexity"],
    "layers": lambda r: r["avg_layers_executed"],
    "balanced": lambda r: r["final_val_perplexity"] + 10.0 * r["avg_layers_executed"],
}
MODES = ("sweep", "full")
CONVERGENCE_SPEED = "validation perplexity drop per epoch: (untrained perplexity - final perplexity) / epochs trained"


def resolve_score(score_metric: str | Callable[[dict[str, Any]], float]) -> tuple[str, Callable]:
    """``(name, function)`` of a score: one of SCORE_METRICS, or any callable ``result -> float`` (lower is better)."""
    if callable(score_metric):
        return getattr(score_metric, "__name__", "custom"), score_metric
    if score_metric not in SCORE_METRICS:
        raise ConfigError(f"unknown score metric {score_metric!r}; choose from {', '.join(SCORE_METRICS)} "
                          "or pass a callable")
    return score_metric, SCORE_METRICS[score_metric]


def check_grid(thresholds: Sequence[float], lambdas: Sequence[float], num_epochs: int) -> None:
    if not thresholds or not lambdas:
        raise ConfigError("give at least one threshold and one lambda")
    for t in thresholds:
        if not 0.0 < t <= 1.0:
            raise ConfigError(f"threshold {t} is outside (0, 1]")
    for lam in lambdas:
        if not lam >= 0.0:
            raise ConfigError(f"lambda {lam} is negative; the ponder cost weight must be >= 0")
    if num_epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {num_epochs}")


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (both minimised), by the first."""
    front = [i for i, (a, b) in enumerate(points)
             if not any((c <= a and d <= b) and (c < a or d < b) for c, d in points)]
    return sorted(front, key=lambda i: points[i])


class ACTHyperparameterTuner:
    """Grid (or Pareto) search over ACT's threshold and lambda for a small PonderLM.

    ``max_steps`` caps the optimizer steps of one training (tests, quick looks); ``max_eval_batches``
    caps validation batches. ``n_trainings`` counts the models trained so far.
    """

    def __init__(self, vocab_size: int, d_model: int = 64, n_layers: int = 4, n_seq: int = 128, *,
                 n_heads: int | None = None, d_ff: int | None = None, lr: float = 3e-3,
                 max_steps: int | None = None, max_eval_batches: int | None = None, device: str = "cpu",
                 progress: bool = False) -> None:
        self.vocab_size, self.d_model, self.n_layers, self.n_seq = vocab_size, d_model, n_layers, n_seq
        self.n_heads = n_heads or max(1, d_model // 32)
        self.d_ff = d_ff or 4 * d_model
        self.lr, self.max_steps, self.max_eval_batches = lr, max_steps, max_eval_batches
        self.device = torch.device(device)
        self.progress = progress
        self.poll_interval = 1.0  # seconds between looks at a shared storage while other workers finish
        self.n_trainings = 0
        self.results: list[dict[str, Any]] = []
        self.best_config: dict[str, float] | None = None
        self.best_score: float | None = None
        self.meta: dict[str, Any] = {}

    # -- models -----------------------------------------------------------------------------------------

    def shape(self) -> dict[str, int]:
        """The shape of every model this tuner trains (the report's ``model``)."""
        return {"d_model": self.d_model, "n_layers": self.n_layers, "n_heads": self.n_heads, "d_ff": self.d_ff,
                "max_seq_len": self.n_seq, "vocab_size": self.vocab_size}

    def create_model(self, act_threshold: float, act_lambda: float, seed: int | None = None) -> PonderLM:
        """A PonderLM with the ACT halting rule (``act_lambda``) and ``act_threshold`` as its threshold dial."""
        if seed is not None:
            torch.manual_seed(seed)
        cfg = ModelConfig(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers,
                          n_heads=self.n_heads, n_local_heads=self.n_heads // 2, d_ff=self.d_ff,
                          max_seq_len=self.n_seq, attn_window=float(min(40, self.n_seq)),
                          act_threshold=act_threshold)
        return PonderLM(cfg, halting=PluginSpec("act", {"act_lambda": act_lambda})).to(self.device)

    def train_model(self, model: PonderLM, train_loader: DataLoader, num_epochs: int,
                    seed: int | None = None) -> dict[str, float]:
        """``num_epochs`` passes over ``train_loader`` (AdamW, 10% linear warm-up, clip 1.0), at most ``max_steps``.
        With ``seed``, a loader's shuffling generator is reseeded, so every training of a seed sees the same order."""
        if seed is not None and isinstance(getattr(train_loader, "generator", None), torch.Generator):
            train_loader.generator.manual_seed(seed)
        total = num_epochs * len(train_loader)
        if self.max_steps is not None:
            total = min(total, self.max_steps)
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr)
        warmup = max(1, total // 10)
        model.train()
        step, started = 0, time.perf_counter()
        while step < total:
            for x, y in train_loader:
                if step >= total:
                    break
                for group in opt.param_groups:
                    group["lr"] = self.lr * min(1.0, (step + 1) / warmup)
                out = model(x.to(self.device), y.to(self.device))
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
        self.n_trainings += 1
        return {"training_time": time.perf_counter() - started, "steps": step,
                "epochs": step / max(1, len(train_loader))}

    @torch.no_grad()
    def evaluate_detailed(self, model: PonderLM, loader: DataLoader, threshold: float | None = None) -> dict[str, Any]:
        """Validation perplexity, ``avg_layers_executed`` (per batch: the deepest token's depth, averaged; in
        ``[1, n_layers]``) and ``mean_token_depth``."""
        was_training = model.training
        model.eval()
        ce_sum = depth_sum = 0.0
        tokens = layers = batches = 0
        for x, y in loader:
            if self.max_eval_batches is not None and batches >= self.max_eval_batches:
                break
            out = model(x.to(self.device), y.to(self.device), threshold=threshold)
            ce_sum += out.ce.item() * y.numel()
            tokens += y.numel()
            layers += out.layers_executed
            depth_sum += float(out.depth.sum())
            batches += 1
        model.train(was_training)
        if batches == 0:
            raise DataError("the validation loader yielded no batches")
        return {"perplexity": math.exp(min(ce_sum / tokens, 50.0)), "avg_layers_executed": layers / batches,
                "mean_token_depth": depth_sum / tokens}

    def evaluate(self, model: PonderLM, loader: DataLoader, threshold: float | None = None) -> float:
        """Validation perplexity (see ``evaluate_detailed`` for the layers executed too)."""
        return self.evaluate_detailed(model, loader, threshold)["perplexity"]

    # -- one configuration -------------------------------------------------------------------------------

    def _train_and_eval(self, train_loader, val_loader, thresholds, lam, num_epochs, seed,
                        train_threshold: float | None = None) -> dict[float, dict]:
        """Train one model (lambda, seed; halting at ``train_threshold`` during training, default the only
        threshold) and evaluate it at each threshold: ``{threshold: run}``."""
        model = self.create_model(thresholds[0] if train_threshold is None else train_threshold, lam, seed=seed)
        before = {t: self.evaluate_detailed(model, val_loader, t)["perplexity"] for t in thresholds}
        info = self.train_model(model, train_loader, num_epochs, seed=seed)
        runs = {}
        for t in thresholds:
            started = time.perf_counter()
            ev = self.evaluate_detailed(model, val_loader, t)
            runs[t] = {**ev, **info, "eval_time": time.perf_counter() - started,
                       "convergence_speed": (before[t] - ev["perplexity"]) / max(info["epochs"], 1e-9)}
        return runs

    def _summarise(self, threshold: float, lam: float, runs: list[dict], shared_by: int) -> dict[str, Any]:
        def mean(key):
            return statistics.fmean(r[key] for r in runs)

        r: dict[str, Any] = {
            "threshold": threshold, "lambda": lam,
            "final_val_perplexity": mean("perplexity"), "avg_layers_executed": mean("avg_layers_executed"),
            "mean_token_depth": mean("mean_token_depth"), "training_time": mean("training_time"),
            "training_time_shared_by": shared_by, "eval_time": mean("eval_time"),
            "convergence_speed": mean("convergence_speed"), "steps": runs[0]["steps"], "epochs": runs[0]["epochs"],
        }
        r["speedup_potential"] = self.n_layers / r["avg_layers_executed"]
        if len(runs) > 1:
            r["seeds"] = len(runs)
            r["final_val_perplexity_std"] = statistics.stdev(x["perplexity"] for x in runs)
            r["avg_layers_executed_std"] = statistics.stdev(x["avg_layers_executed"] for x in runs)
            r["mean_token_depth_std"] = statistics.stdev(x["mean_token_depth"] for x in runs)
        return r

    # -- searches ------------------------------------------------------------------------------------------

    def _study(self, optuna, storage, study_name, sampler, directions):
        name = study_name or ("ponder-act-grid" if len(directions) == 1 else "ponder-act-pareto")
        return optuna.create_study(study_name=name, storage=storage, sampler=sampler, directions=directions,
                                   load_if_exists=True)

    def _wait_note(self, bar, note: str) -> None:
        if self.progress:
            bar.set_postfix_str(note)
            bar.refresh()
        else:
            print(f"tune: {note}", file=sys.stderr, flush=True)

    def grid_search(self, train_loader: DataLoader, val_loader: DataLoader,
                    threshold_values: Sequence[float] = DEFAULT_THRESHOLDS,
                    lambda_values: Sequence[float] = DEFAULT_LAMBDAS, num_epochs: int = 3,
                    score_metric: str | Callable[[dict[str, Any]], float] = "balanced", *, mode: str = "sweep",
                    seeds: int = 1, storage: str | None = None, study_name: str | None = None,
                    train_threshold: float | None = None, heartbeat_interval: int = HEARTBEAT_INTERVAL,
                    grace_period: int | None = None) -> dict[str, Any]:
        """Every threshold × lambda cell, one Optuna trial each (a GridSampler study); returns
        ``{best_config, best_score, all_results, ...}``. Cells already COMPLETE in ``storage`` are not redone.

        The model's threshold also decides where tokens halt DURING training; in sweep mode each lambda's
        model trains at ``train_threshold`` (default: the grid's highest threshold) and is evaluated at all.

        Several workers (processes, hosts) may run this on one ``storage`` at once: each cell is claimed with
        a RUNNING trial before it is computed (see ``resolve_claims``), so every cell is computed once. A
        worker that runs out of cells waits for the ones others are computing, takes over any whose claim
        turns FAIL, and reports the full table. With an RDB URL the claims beat every ``heartbeat_interval``
        seconds and a claim silent for ``grace_period`` seconds (default 4 intervals) is failed and redone."""
        check_grid(threshold_values, lambda_values, num_epochs)
        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        if seeds < 1:
            raise ConfigError(f"seeds must be >= 1, got {seeds}")
        score_name, score_fn = resolve_score(score_metric)
        optuna = quiet_optuna()
        from tqdm import tqdm

        thresholds = [float(t) for t in dict.fromkeys(threshold_values)]
        train_threshold = max(thresholds) if train_threshold is None else float(train_threshold)
        check_grid([train_threshold], [0.0], 1)
        lambdas = [float(v) for v in dict.fromkeys(lambda_values)]
        sampler = optuna.samplers.GridSampler({"threshold": thresholds, "lambda": lambdas}, seed=0)
        study = self._study(optuna, open_storage(storage, heartbeat_interval, grace_period), study_name, sampler,
                            ["minimize"])
        order = [(t, lam) for lam in lambdas for t in thresholds]  # every worker takes the cells in this order
        distributions = {"threshold": optuna.distributions.CategoricalDistribution(thresholds),
                         "lambda": optuna.distributions.CategoricalDistribution(lambdas)}
        grids = getattr(sampler, "_all_grids", None)
        state = optuna.trial.TrialState
        cells = set(order)
        computed_here = 0

        def survey() -> tuple[dict, dict]:
            """``({cell: result}, {cell: number})``: the COMPLETE cells and the cells a live claim holds."""
            fail_stale_claims(study)
            complete: dict[tuple, dict] = {}
            running: dict[tuple, int] = {}
            for trial in study.get_trials(deepcopy=False, states=(state.RUNNING, state.COMPLETE)):
                cell = cell_of(trial)
                if cell is None or cell[2:] != (mode, seeds) or cell[:2] not in cells or not holds_cell(trial):
                    continue
                if trial.state == state.COMPLETE:
                    complete.setdefault(cell[:2], trial.user_attrs["result"])
                else:
                    running.setdefault(cell[:2], trial.number)
            return complete, running

        def template(t, lam):
            # a RUNNING trial of the GridSampler's study, marked with its grid point so the sampler (e.g. a
            # later study.optimize) counts it as visited
            system = ({"search_space": sampler._search_space, "grid_id": grids.index((lam, t))}
                      if grids and (lam, t) in grids else {})
            return optuna.trial.create_trial(state=state.RUNNING, params={"threshold": t, "lambda": lam},
                                             distributions=distributions, system_attrs=system,
                                             user_attrs={"mode": mode, "seeds": seeds})

        def claim(group: list[tuple]) -> dict[tuple, int]:
            """Claim ``group``'s cells; ``{cell: trial_id}`` of those this worker won."""
            fail_stale_claims(study)
            ids = {}
            for cell in group:
                ids[cell] = create_claim(study, template(*cell))
                beat.hold(ids[cell])
            won = resolve_claims(study, list(ids.values()))
            for trial_id, ok in won.items():
                if not ok:
                    beat.release(trial_id)
            return {cell: trial_id for cell, trial_id in ids.items() if won[trial_id]}

        def finish(trial_id: int, result: dict) -> None:
            nonlocal computed_here
            result["score"] = float(score_fn(result))
            try:
                study._storage.set_trial_user_attr(trial_id, "result", result)
                # the storage's own call rather than study.tell: tell runs the GridSampler's after_trial,
                # which calls study.stop() on the last cell, and that raises outside study.optimize
                study._storage.set_trial_state_values(trial_id, state.COMPLETE, [result["score"]])
            except optuna.exceptions.UpdateFinishedTrialError:  # failed as stale meanwhile: redone elsewhere
                print(f"tune: the claim of threshold {result['threshold']:g}, lambda {result['lambda']:g} went "
                      "stale while it was computed; the cell is left to the worker that took it over",
                      file=sys.stderr)
            else:
                computed_here += 1
            finally:
                beat.release(trial_id)

        complete, running = survey()
        resumed = len(complete)
        bar = tqdm(total=len(order), initial=resumed, desc="tune", unit="trial", disable=not self.progress,
                   dynamic_ncols=True)
        note = None
        with Heartbeat(study._storage) as beat:
            try:
                while len(complete) < len(order):
                    free = [c for c in order if c not in complete and c not in running]
                    if not free:  # every missing cell is being computed by another worker
                        n = len(order) - len(complete)
                        waiting = f"waiting for {n} cell{'s' * (n != 1)} that other workers are running"
                        if waiting != note:
                            self._wait_note(bar, note := waiting)
                        time.sleep(self.poll_interval)
                    elif mode == "sweep":  # all of the first free lambda's cells, one training for those won
                        lam = free[0][1]
                        won = claim([c for c in free if c[1] == lam])
                        if won:
                            pending = [t for t in thresholds if (t, lam) in won]
                            per_seed = [self._train_and_eval(train_loader, val_loader, pending, lam, num_epochs,
                                                             s, train_threshold) for s in range(seeds)]
                            for t in pending:
                                result = self._summarise(t, lam, [r[t] for r in per_seed], len(pending))
                                finish(won[(t, lam)], {**result, "train_threshold": train_threshold})
                    else:
                        t, lam = free[0]
                        won = claim([(t, lam)])
                        if won:
                            runs = [self._train_and_eval(train_loader, val_loader, [t], lam, num_epochs, s)[t]
                                    for s in range(seeds)]
                            finish(won[(t, lam)], self._summarise(t, lam, runs, 1))
                    complete, running = survey()
                    bar.n = len(complete)
                    bar.refresh()
            except BaseException as e:  # Ctrl-C or an error: give this worker's claims back at once
                beat.fail_held(f"{type(e).__name__} in the worker")
                raise
            finally:
                bar.close()
        results = [dict(complete[c]) for c in order]
        for r in results:  # a custom score re-scores resumed cells too
            r["score"] = float(score_fn(r))
        return self._finish(results, score_name, mode=mode, search="grid", seeds=seeds,
                            train_threshold=train_threshold if mode == "sweep" else "each cell's own",
                            thresholds=thresholds, lambdas=lambdas, resumed_trials=resumed,
                            cells_computed_here=computed_here)

    def pareto_search(self, train_loader: DataLoader, val_loader: DataLoader, n_trials: int = 20,
                      threshold_range: tuple[float, float] = (0.5, 0.99),
                      lambda_range: tuple[float, float] = (0.001, 0.1), num_epochs: int = 3,
                      score_metric: str | Callable[[dict[str, Any]], float] = "balanced", *, seeds: int = 1,
                      storage: str | None = None, study_name: str | None = None,
                      heartbeat_interval: int = HEARTBEAT_INTERVAL, grace_period: int | None = None) -> dict[str, Any]:
        """Multi-objective search (NSGA-II; objectives: perplexity, avg layers) for ``n_trials`` trials in all
        (finished trials in ``storage`` count). The best config is the Pareto-optimal one with the lowest score.

        Several workers may share one ``storage``: together they run ``n_trials`` trials (RUNNING ones count
        toward the total), and each waits for the others' trials before it reports."""
        check_grid(list(threshold_range), list(lambda_range), num_epochs)
        if lambda_range[0] <= 0 or threshold_range[0] > threshold_range[1] or lambda_range[0] > lambda_range[1]:
            raise ConfigError("pareto search needs lo <= hi and a lambda range above 0 (it is searched on a log scale)")
        score_name, score_fn = resolve_score(score_metric)
        optuna = quiet_optuna()
        from tqdm import tqdm

        sampler = optuna.samplers.NSGAIISampler(seed=0, population_size=max(2, min(10, n_trials)))
        study = self._study(optuna, open_storage(storage, heartbeat_interval, grace_period), study_name, sampler,
                            ["minimize", "minimize"])
        complete, running = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING

        def count(*states):
            return len(study.get_trials(deepcopy=False, states=states))

        fail_stale_claims(study)
        resumed = count(complete)
        bar = tqdm(total=n_trials, initial=min(resumed, n_trials), desc="tune", unit="trial",
                   disable=not self.progress, dynamic_ncols=True)
        computed_here, surplus = 0, 0

        def objective(trial):
            nonlocal computed_here, surplus
            # the lowest-number rule of grid claims: a trial counts only if fewer than n_trials RUNNING or
            # COMPLETE trials came before it (its creator sees them all), so workers that ask at the same
            # moment never run more than n_trials in all; a surplus trial is PRUNED before any work
            ahead = study.get_trials(deepcopy=False, states=(complete, running))
            if sum(x.number < trial.number for x in ahead) >= n_trials:
                surplus += 1
                trial.set_user_attr("surplus", True)
                raise optuna.TrialPruned(f"the study already holds {n_trials} trials")
            t = trial.suggest_float("threshold", *threshold_range)
            lam = trial.suggest_float("lambda", *lambda_range, log=True)
            runs = [self._train_and_eval(train_loader, val_loader, [t], lam, num_epochs, s)[t] for s in range(seeds)]
            result = self._summarise(t, lam, runs, 1)
            trial.set_user_attr("result", result)
            values = result["final_val_perplexity"], result["avg_layers_executed"]
            if all(math.isfinite(v) for v in values):
                computed_here += 1
            bar.update(1)
            return values

        # every worker stops once the study holds n_trials trials, its own and the others' (RUNNING included)
        stop = optuna.study.MaxTrialsCallback(n_trials, states=(complete, running))
        note = None
        try:
            while True:
                fail_stale_claims(study)
                todo = n_trials - count(complete, running)
                if todo > 0:
                    before = computed_here, surplus
                    with experimental_ok():
                        study.optimize(objective, n_trials=todo, callbacks=[stop])
                    if (computed_here, surplus) == before:  # every trial FAILed (values not finite): stop here
                        break
                    continue
                others = count(running)
                if not others:
                    break
                waiting = f"waiting for {others} trial{'s' * (others != 1)} that other workers are running"
                if waiting != note:
                    self._wait_note(bar, note := waiting)
                bar.n = min(count(complete), n_trials)
                bar.refresh()
                time.sleep(self.poll_interval)
        finally:
            bar.close()
        results = [dict(t.user_attrs["result"]) for t in study.get_trials(deepcopy=False, states=(complete,))
                   if "result" in t.user_attrs]
        for r in results:
            r["score"] = float(score_fn(r))
        front = pareto_front([(r["final_val_perplexity"], r["avg_layers_executed"]) for r in results])
        return self._finish(results, score_name, mode="full", search="pareto", seeds=seeds, candidates=front,
                            resumed_trials=resumed, cells_computed_here=computed_here,
                            threshold_range=list(threshold_range), lambda_range=list(lambda_range))

    def _finish(self, results, score_name, candidates=None, **meta) -> dict[str, Any]:
        pool = [results[i] for i in candidates] if candidates is not None else results
        best = min(pool, key=lambda r: r["score"])
        self.results = results
        self.best_config = {"threshold": best["threshold"], "lambda": best["lambda"]}
        self.best_score = best["score"]
        self.meta = {"score_metric": score_name, "n_layers": self.n_layers, "model": self.shape(),
                     "n_trainings": self.n_trainings,
                     "convergence_speed": CONVERGENCE_SPEED,
                     "training_time": "seconds of the training behind a result; in sweep mode one training per "
                                      "lambda is shared by training_time_shared_by thresholds",
                     **meta}
        return self.report()

    def report(self) -> dict[str, Any]:
        return {"best_config": self.best_config, "best_score": self.best_score, "all_results": self.results,
                **self.meta}

    # -- output --------------------------------------------------------------------------------------------

    def save_results(self, path: str | Path) -> Path:
        if self.best_config is None:
            raise ConfigError("no results yet: run grid_search (or pareto_search) first")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.report(), indent=2) + "\n")
        return path

    def plot_results(self, save_path: str | Path) -> Path:
        """Three heat maps over threshold × lambda (perplexity, layers, score), a white star on the best cell."""
        from ponder.tune_plots import plot_heatmaps

        if self.best_config is None:
            raise ConfigError("no results yet: run grid_search first")
        return plot_heatmaps(self.results, self.best_config, save_path, self.meta.get("score_metric", "score"))

    def plot_pareto(self, save_path: str | Path) -> Path:
        """Perplexity against avg layers executed for every result, the Pareto front drawn."""
        from ponder.tune_plots import plot_pareto

        return plot_pareto(self.results, self.best_config, save_path, self.n_layers)


def make_loaders(data_path: str | Path | None, batch_size: int, n_seq: int, seed: int = 0,
                 text_chars: int | None = None) -> tuple[DataLoader, DataLoader, int]:
    """``(train_loader, val_loader, vocab_size)``: the embedded corpus (bytes) when ``data_path`` is None,
    a text file (bytes, split 90/5/5), or a WikiText-2 folder (words). A given path that is missing is an error."""
    if data_path is None:
        cfg = DataConfig(source="embedded")
    else:
        p = Path(data_path)
        if p.is_file():
            cfg = DataConfig(source="text", path=str(p))
        elif p.is_dir():
            cfg = DataConfig(source="wikitext2", path=str(p), tokenizer="word")
        else:
            raise DataError(f"data path {str(p)!r} does not exist: give a WikiText-2 folder or a text file, "
                            "or leave it out for the embedded corpus")
    corpus = prepare_data(cfg)
    train = TokenChunks(corpus.splits["train"], n_seq)
    valid = TokenChunks(corpus.splits["valid"], n_seq)
    gen = torch.Generator().manual_seed(seed)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen, drop_last=len(train) > batch_size),
            DataLoader(valid, batch_size=batch_size), corpus.tokenizer.vocab_size)


def run_act_hyperparameter_tuning(data_path: str | Path | None = None, batch_size: int = 32, num_epochs: int = 3,
                                  output_dir: str | Path = "results/act_tuning", *,
                                  threshold_values: Sequence[float] = DEFAULT_THRESHOLDS,
                                  lambda_values: Sequence[float] = DEFAULT_LAMBDAS,
                                  score_metric: str | Callable = "balanced", mode: str = "sweep",
                                  search: str = "grid", n_trials: int = 20, seeds: int = 1,
                                  storage: str | None = None, study_name: str | None = None,
                                  d_model: int = 64, n_layers: int = 4, n_seq: int = 128,
                                  max_steps: int | None = None, max_eval_batches: int | None = None,
                                  device: str = "cpu", progress: bool = True,
                                  train_threshold: float | None = None,
                                  heartbeat_interval: int = HEARTBEAT_INTERVAL,
                                  grace_period: int | None = None) -> dict[str, Any]:
    """Load data, tune, and write ``act_tuning_results.json``, ``act_tuning_heatmap.png`` (grid search)
    and ``act_tuning_pareto.png`` into ``output_dir``; returns the results. ``data_path=None``: embedded corpus.
    Several workers may share one ``storage`` (see ``ACTHyperparameterTuner.grid_search``)."""
    if search not in ("grid", "pareto"):
        raise ConfigError(f"unknown search {search!r}; choose grid or pareto")
    check_grid(threshold_values, lambda_values, num_epochs)
    resolve_score(score_metric)
    if batch_size < 1 or n_trials < 1 or seeds < 1 or (max_steps is not None and max_steps < 1):
        raise ConfigError("batch size, trials, seeds and steps must be >= 1")
    storage = open_storage(storage, heartbeat_interval, grace_period)  # before any data is read or model trained
    train_loader, val_loader, vocab_size = make_loaders(data_path, batch_size, n_seq)
    tuner = ACTHyperparameterTuner(vocab_size, d_model, n_layers, n_seq, max_steps=max_steps,
                                   max_eval_batches=max_eval_batches, device=device, progress=progress)
    common = {"num_epochs": num_epochs, "score_metric": score_metric, "seeds": seeds, "storage": storage,
              "study_name": study_name, "heartbeat_interval": heartbeat_interval, "grace_period": grace_period}
    if search == "grid":
        results = tuner.grid_search(train_loader, val_loader, threshold_values, lambda_values, mode=mode,
                                    train_threshold=train_threshold, **common)
    else:
        results = tuner.pareto_search(train_loader, val_loader, n_trials,
                                      (min(threshold_values), max(threshold_values)),
                                      (min(lambda_values), max(lambda_values)), **common)
    tuner.meta["data"] = describe_data(data_path)
    results = tuner.report()
    out = Path(output_dir)
    tuner.save_results(out / "act_tuning_results.json")
    if search == "grid":
        tuner.plot_results(out / "act_tuning_heatmap.png")
    tuner.plot_pareto(out / "act_tuning_pareto.png")
    return results


def describe_data(data_path: str | Path | None) -> str:
    """What ``make_loaders`` reads from ``data_path``, in words (the report's ``data``)."""
    if data_path is None:
        return "the embedded corpus (bytes)"
    kind = "WikiText-2, words" if Path(data_path).is_dir() else "bytes"
    return f"{data_path} ({kind})"
