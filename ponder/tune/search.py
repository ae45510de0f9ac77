"""The Optuna searches of the ACT tuner: a grid (one trial per threshold × lambda cell, claimed in a shared storage
so that several workers compute each cell once) and a Pareto search (NSGA-II on perplexity and layers).

:class:`OptunaSearches` is the searching half of ``ACTHyperparameterTuner``: it asks the tuner for
``_start(train_loader, val_loader)`` (check the loaders), ``_train_and_eval(...)`` (one training, evaluated at
thresholds: ``{threshold: run}``) and ``best_run()``, and reads ``n_layers``, ``progress``, ``poll_interval``,
``n_trainings`` and ``shape()``.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from ponder.errors import ConfigError
from ponder.limits import check_threshold
from ponder.tune.claims import (
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
from ponder.tune.report import (
    CONVERGENCE_SPEED,
    DEFAULT_EPOCHS,
    DEFAULT_LAMBDAS,
    DEFAULT_THRESHOLDS,
    DEFAULT_TRIALS,
    MODES,
    TRAINING_TIME,
    check_choice,
    check_grid,
    pareto_front,
    resolve_score,
    summarise,
)


class OptunaSearches:
    """``grid_search`` and ``pareto_search`` over the tuner's trainings; ``report()`` of the last search."""

    n_layers: int
    progress: bool
    poll_interval: float
    n_trainings: int
    results: list[dict[str, Any]]
    best_config: dict[str, float] | None
    best_score: float | None
    meta: dict[str, Any]

    # -- what the tuner provides -------------------------------------------------------------------------------

    def _start(self, train_loader: Any, val_loader: Any) -> None:
        """Check the loaders before any trial."""
        raise NotImplementedError

    def _train_and_eval(self, train_loader: Any, val_loader: Any, thresholds: list[float], lam: float,
                        num_epochs: int, seed: int, train_threshold: float | None = None) -> dict[float, dict]:
        """Train one model and evaluate it at each threshold: ``{threshold: run}``."""
        raise NotImplementedError

    def shape(self) -> dict[str, int]:
        raise NotImplementedError

    def best_run(self) -> dict[str, Any] | None:
        raise NotImplementedError

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

    def grid_search(self, train_loader: Any, val_loader: Any,
                    threshold_values: Sequence[float] = DEFAULT_THRESHOLDS,
                    lambda_values: Sequence[float] = DEFAULT_LAMBDAS, num_epochs: int = DEFAULT_EPOCHS,
                    score_metric: str | Callable[[dict[str, Any]], float] = "balanced", *, mode: str = "sweep",
                    seeds: int = 1, storage: str | None = None, study_name: str | None = None,
                    train_threshold: float | None = None, heartbeat_interval: int = HEARTBEAT_INTERVAL,
                    grace_period: int | None = None) -> dict[str, Any]:
        """Every threshold × lambda cell, one Optuna trial each (a GridSampler study); returns
        ``{best_config, best_score, all_results, ...}``. Cells already COMPLETE in ``storage`` are not redone.
        The loaders give the token windows and batch sizes (see ``ponder.tune.loaders``); each training is a
        ``ponder train`` run (``ACTHyperparameterTuner.run_config``) trained by the Trainer in memory.

        The model's threshold also decides where tokens halt DURING training; in sweep mode each lambda's
        model trains at ``train_threshold`` (default: the grid's highest threshold) and is evaluated at all.

        Several workers (processes, hosts) may run this on one ``storage`` at once: each cell is claimed with
        a RUNNING trial before it is computed (see ``resolve_claims``), so every cell is computed once. A
        worker that runs out of cells waits for the ones others are computing, takes over any whose claim
        turns FAIL, and reports the full table. With an RDB URL the claims beat every ``heartbeat_interval``
        seconds and a claim silent for ``grace_period`` seconds (default 4 intervals) is failed and redone."""
        check_grid(threshold_values, lambda_values, num_epochs)
        check_choice(mode, MODES, "mode")
        if seeds < 1:
            raise ConfigError(f"seeds must be >= 1, got {seeds}")
        score_name, score_fn = resolve_score(score_metric)
        self._start(train_loader, val_loader)
        optuna = quiet_optuna()
        from tqdm import tqdm

        thresholds = [float(t) for t in dict.fromkeys(threshold_values)]
        train_threshold = max(thresholds) if train_threshold is None else float(train_threshold)
        check_threshold(train_threshold, "train_threshold")
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

        def give_back(won: dict[tuple, int]) -> None:
            for trial_id in won.values():
                with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                    study._storage.set_trial_user_attr(trial_id, "yielded", True)
                    study._storage.set_trial_state_values(trial_id, state.FAIL)
                beat.release(trial_id)

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
                        group = [c for c in free if c[1] == lam]
                        won = claim(group)
                        if won and len(won) < len(group):
                            # another worker claimed part of this lambda at the same moment: both give their part
                            # back and try again after pauses of their own, so that one worker trains it once
                            give_back(won)
                            time.sleep(self.poll_interval * (1.0 + random.random()))
                        elif won:
                            pending = [t for t in thresholds if (t, lam) in won]
                            per_seed = [self._train_and_eval(train_loader, val_loader, pending, lam, num_epochs,
                                                             s, train_threshold) for s in range(seeds)]
                            for t in pending:
                                result = summarise(t, lam, [r[t] for r in per_seed], len(pending), self.n_layers)
                                finish(won[(t, lam)], {**result, "train_threshold": train_threshold})
                    else:
                        t, lam = free[0]
                        won = claim([(t, lam)])
                        if won:
                            runs = [self._train_and_eval(train_loader, val_loader, [t], lam, num_epochs, s)[t]
                                    for s in range(seeds)]
                            finish(won[(t, lam)], summarise(t, lam, runs, 1, self.n_layers))
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

    def pareto_search(self, train_loader: Any, val_loader: Any, n_trials: int = DEFAULT_TRIALS,
                      threshold_range: tuple[float, float] = (0.5, 0.99),
                      lambda_range: tuple[float, float] = (0.001, 0.1), num_epochs: int = DEFAULT_EPOCHS,
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
        self._start(train_loader, val_loader)
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
            result = summarise(t, lam, runs, 1, self.n_layers)
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
                     "n_trainings": self.n_trainings, "convergence_speed": CONVERGENCE_SPEED,
                     "training_time": TRAINING_TIME, **meta, "run": self.best_run()}
        return self.report()

    def report(self) -> dict[str, Any]:
        return {"best_config": self.best_config, "best_score": self.best_score, "all_results": self.results,
                **self.meta}

