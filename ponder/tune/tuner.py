"""The ACT tuner: each training is a ``ponder train`` run, trained in memory by :class:`ponder.train.Trainer` and
measured by :func:`ponder.evaluate.evaluate`.

Every cell's run config is built the way ``ponder train`` parses a TOML file (``parse_config``), so every setting
the tuner does not choose is ``ponder train``'s default, and a base run (``run=``, ``ponder tune --config``) is
tuned as it is: its model, norm, optimizer, controllers and train settings. Per cell only ``[halting] act_lambda``,
``model.act_threshold`` and ``train.steps`` change; per tuning the data's vocabulary, batch size and sequence
length (from the loaders), the seed (base seed + 0..seeds-1) and the device.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ponder import registry
from ponder.config import ModelConfig, RunConfig, TrainConfig, parse_config
from ponder.data import prepare_data
from ponder.errors import CheckpointError, ConfigError
from ponder.evaluate import evaluate
from ponder.model import PonderLM, build_model
from ponder.train import Trainer
from ponder.tune.claims import HEARTBEAT_INTERVAL, open_storage
from ponder.tune.loaders import TuningData, chunks_of, data_config, describe_data, loaders_for
from ponder.tune.report import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_D_MODEL,
    DEFAULT_EPOCHS,
    DEFAULT_LAMBDAS,
    DEFAULT_N_LAYERS,
    DEFAULT_OUTPUT_DIR,
    DEFAULT_SEQ_LEN,
    DEFAULT_THRESHOLDS,
    DEFAULT_TRIALS,
    SEARCHES,
    check_choice,
    check_grid,
    resolve_score,
)
from ponder.tune.search import OptunaSearches


class ACTHyperparameterTuner(OptunaSearches):
    """Grid (or Pareto) search over ACT's threshold and lambda, each training a ``ponder train`` run.

    Without ``run`` the model is shaped by ``d_model`` (default 64), ``n_layers`` (4) and ``n_seq`` (its context,
    128), with ``n_heads`` d_model / 32 (at least 1) and ``d_ff`` 4 x d_model unless given; everything else is
    ``ponder train``'s default: see :meth:`run_config`. With ``run`` (a RunConfig) that run is tuned as it is; the
    shape arguments may then be left out (given, they must match the run's model). ``lr`` overrides the optimizer's
    learning rate (default: ``ponder train``'s, adamw at 3e-3, or the run's).

    ``max_steps`` caps the optimizer steps of one training (tests, quick looks); ``max_eval_batches`` caps
    validation batches, the tuner's and the Trainer's own (``train.eval_batches``). ``n_trainings`` counts the
    models trained so far.
    """

    def __init__(self, vocab_size: int, d_model: int | None = None, n_layers: int | None = None,
                 n_seq: int | None = None, *, run: RunConfig | None = None, n_heads: int | None = None,
                 d_ff: int | None = None, lr: float | None = None, max_steps: int | None = None,
                 max_eval_batches: int | None = None, device: str = "cpu", progress: bool = False) -> None:
        self.vocab_size, self.base = vocab_size, run
        if run is None:
            self.d_model = d_model or DEFAULT_D_MODEL
            self.n_layers, self.n_seq = n_layers or DEFAULT_N_LAYERS, n_seq or DEFAULT_SEQ_LEN
            self.n_heads, self.d_ff = n_heads or max(1, self.d_model // 32), d_ff or 4 * self.d_model
        else:
            m = run.model
            theirs = {"d_model": m.d_model, "n_layers": m.n_layers, "n_seq": m.max_seq_len, "n_heads": m.n_heads,
                      "d_ff": m.d_ff}
            given = {"d_model": d_model, "n_layers": n_layers, "n_seq": n_seq, "n_heads": n_heads, "d_ff": d_ff}
            for key, value in given.items():
                if value is not None and value != theirs[key]:
                    raise ConfigError(f"{key} = {value}, but the run config's model has {theirs[key]}: with a run "
                                      f"config its model is tuned as it is; leave {key} out")
            self.d_model, self.n_layers, self.n_seq = m.d_model, m.n_layers, m.max_seq_len
            self.n_heads, self.d_ff = m.n_heads, m.d_ff
            if registry.normalize_name(run.halting.name) != "act":
                raise ConfigError(f"the run config's [halting] is {run.halting.name!r}; the tuner tunes ACT's "
                                  "act_lambda and act_threshold: set [halting] name = \"act\"")
        self.lr, self.max_steps, self.max_eval_batches = lr, max_steps, max_eval_batches
        self.device = torch.device(device)
        self.progress = progress
        self.poll_interval = 1.0  # seconds between looks at a shared storage while other workers finish
        self.n_trainings = 0
        self.results: list[dict[str, Any]] = []
        self.best_config: dict[str, float] | None = None
        self.best_score: float | None = None
        self.meta: dict[str, Any] = {}
        self._data: TuningData | None = None
        self.run_config(max(DEFAULT_THRESHOLDS), 0.0)  # a shape or run that cannot train fails here, before any data

    # -- the run of one training -------------------------------------------------------------------------------

    @property
    def base_seed(self) -> int:
        """The seed of a tuning's first seed: 0, or the run config's ``train.seed``."""
        return 0 if self.base is None else self.base.train.seed

    def run_config(self, act_threshold: float, act_lambda: float, *, steps: int | None = None,
                   batch_size: int | None = None, seq_len: int | None = None, seed: int | None = None) -> RunConfig:
        """The run config of one training, parsed as ``ponder train`` parses a TOML file.

        Without a base run it is the config of this TOML, and nothing else::

            [model]
            vocab_size = V, d_model, n_layers, n_heads, d_ff, max_seq_len = n_seq, act_threshold
            # n_local_heads and attn_window only where ponder train's defaults (2 and 40) do not fit the shape:
            # then n_heads and n_seq
            [halting]
            name = "act"
            act_lambda = ...
            [optimizer]          # only with lr: name = "adamw", lr = ...
            [train]
            steps, batch_size, seq_len (default n_seq), warmup_steps = max(1, steps // 10), seed, device
            eval_batches = max_eval_batches    # only when given: the Trainer's own validation is capped too
            # steps and batch_size default to ponder train's (1000 and 16), seed to 0

        With a base run: that run, with ``act_threshold``, ``act_lambda``, the vocabulary size, the device and
        whichever of ``steps``, ``batch_size``, ``seq_len``, ``seed``, ``lr`` and ``max_eval_batches`` are given."""
        if self.base is None:
            defaults = ModelConfig()
            model: dict[str, Any] = {"vocab_size": self.vocab_size, "d_model": self.d_model, "n_layers": self.n_layers,
                                     "n_heads": self.n_heads, "d_ff": self.d_ff, "max_seq_len": self.n_seq,
                                     "act_threshold": act_threshold}
            if defaults.n_local_heads > self.n_heads:
                model["n_local_heads"] = self.n_heads
            if defaults.attn_window > self.n_seq:
                model["attn_window"] = float(self.n_seq)
            steps = TrainConfig().steps if steps is None else steps
            train = {"steps": steps, "seq_len": seq_len or self.n_seq, "warmup_steps": max(1, steps // 10),
                     "seed": self.base_seed if seed is None else seed, "device": str(self.device)}
            if batch_size is not None:
                train["batch_size"] = batch_size
            if self.max_eval_batches is not None:
                train["eval_batches"] = self.max_eval_batches
            raw: dict[str, Any] = {"model": model, "halting": {"name": "act", "act_lambda": act_lambda}, "train": train}
            if self.lr is not None:
                raw["optimizer"] = {"name": "adamw", "lr": self.lr}
        else:
            raw = self.base.to_json()
            raw["model"].update(vocab_size=self.vocab_size, act_threshold=act_threshold)
            raw["halting"]["act_lambda"] = act_lambda
            if self.lr is not None:
                raw["optimizer"]["lr"] = self.lr
            given = {"steps": steps, "batch_size": batch_size, "seq_len": seq_len, "seed": seed,
                     "eval_batches": self.max_eval_batches}
            raw["train"].update({k: v for k, v in given.items() if v is not None}, device=str(self.device))
        return parse_config(raw)

    def shape(self) -> dict[str, int]:
        """The shape of every model this tuner trains (the report's ``model``)."""
        m = self.run_config(max(DEFAULT_THRESHOLDS), 0.0).model
        return {"d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads, "d_ff": m.d_ff,
                "max_seq_len": m.max_seq_len, "vocab_size": m.vocab_size}

    # -- models ------------------------------------------------------------------------------------------------

    def create_model(self, act_threshold: float, act_lambda: float, seed: int | None = None) -> PonderLM:
        """The model ``ponder train`` builds from :meth:`run_config` (``seed``: torch's seed before it is built)."""
        if seed is not None:
            torch.manual_seed(seed)
        return build_model(self.run_config(act_threshold, act_lambda), self.vocab_size).to(self.device)

    def training_run(self, data: TuningData, act_threshold: float, act_lambda: float, num_epochs: int,
                     seed: int | None = None) -> RunConfig:
        """:meth:`run_config` for ``num_epochs`` epochs of ``data`` (at most ``max_steps`` steps) in its batches."""
        steps = num_epochs * data.steps_per_epoch
        if self.max_steps is not None:
            steps = min(steps, self.max_steps)
        return self.run_config(act_threshold, act_lambda, steps=max(1, steps), batch_size=data.batch_size,
                               seq_len=data.seq_len, seed=seed)

    def trainer(self, train_loader: DataLoader, val_loader: DataLoader | None, act_threshold: float,
                act_lambda: float, num_epochs: int, seed: int | None = None) -> Trainer:
        """The in-memory Trainer of one training (``training_run``); ``seed`` defaults to the base seed."""
        data = self._prepare(train_loader, val_loader)
        run = self.training_run(data, act_threshold, act_lambda, num_epochs, seed)
        return Trainer(run, None, progress=False, corpus=data.corpus())

    def _train(self, trainer: Trainer) -> dict[str, float]:
        started = time.perf_counter()
        trainer.train()
        self.n_trainings += 1
        return {"training_time": time.perf_counter() - started, "steps": trainer.step,
                "epochs": trainer.step / trainer.steps_per_epoch}

    def train_model(self, model: PonderLM, train_loader: DataLoader, num_epochs: int, seed: int | None = None, *,
                    val_loader: DataLoader | None = None) -> dict[str, float]:
        """Train ``model`` in place as ``ponder train`` would: the Trainer, with this tuner's run config for the
        model's own config, norm and halting, from the model's weights and dials, for ``num_epochs`` epochs (at
        most ``max_steps``). The Trainer's own validation (which ``after_eval`` controllers see) runs on
        ``val_loader``, or on the training data when none is given. Returns the training's time, steps and epochs."""
        data = self._prepare(train_loader, val_loader)
        run = self.training_run(data, model.cfg.act_threshold, model.halting_spec.params.get("act_lambda", 0.0),
                                num_epochs, seed)
        run = dataclasses.replace(run, model=dataclasses.replace(model.cfg, vocab_size=self.vocab_size),
                                  norm=model.norm_spec, halting=model.halting_spec)
        trainer = Trainer(run, None, progress=False, corpus=data.corpus())
        try:
            trainer.model.load_state_dict(model.state_dict())
            trainer.model.dials.load_state_dict(model.dials.state_dict())
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"the model does not fit its own run config: {exc}") from None
        info = self._train(trainer)
        model.load_state_dict(trainer.model.state_dict())
        model.dials.load_state_dict(trainer.model.dials.state_dict())
        return info

    @torch.no_grad()
    def evaluate_detailed(self, model: PonderLM, loader: DataLoader, threshold: float | None = None) -> dict[str, Any]:
        """:func:`ponder.evaluate.evaluate` on the loader's data (its first ``max_eval_batches`` batches): validation
        ``perplexity``, ``avg_layers_executed`` (per batch: the deepest token's depth, averaged; in
        ``[1, n_layers]``) and ``mean_token_depth``."""
        chunks, batch_size = chunks_of(loader, "validation")
        ev = evaluate(model, chunks, batch_size=batch_size, max_batches=self.max_eval_batches, threshold=threshold)
        return {"perplexity": ev["perplexity"], "avg_layers_executed": ev["layers_executed"],
                "mean_token_depth": ev["mean_token_depth"]}

    def evaluate(self, model: PonderLM, loader: DataLoader, threshold: float | None = None) -> float:
        """Validation perplexity (see ``evaluate_detailed`` for the layers executed too)."""
        return self.evaluate_detailed(model, loader, threshold)["perplexity"]

    def _prepare(self, train_loader: Any, val_loader: Any) -> TuningData:
        """The loaders' token windows and batch sizes (a ConfigError for loaders over anything but TokenChunks)."""
        return TuningData.of(train_loader, val_loader, self.vocab_size)

    def _start(self, train_loader: Any, val_loader: Any) -> None:
        """At the start of a search: check the loaders before any trial, and keep what they hold for the report."""
        self._data = self._prepare(train_loader, val_loader)

    # -- one configuration -------------------------------------------------------------------------------------

    def _train_and_eval(self, train_loader, val_loader, thresholds, lam, num_epochs, seed,
                        train_threshold: float | None = None) -> dict[float, dict]:
        """Train one model (lambda, seed: base seed + ``seed``; halting at ``train_threshold`` during training,
        default the only threshold) and evaluate it at each threshold: ``{threshold: run}``."""
        trainer = self.trainer(train_loader, val_loader, thresholds[0] if train_threshold is None else train_threshold,
                               lam, num_epochs, self.base_seed + seed)
        before = {t: self.evaluate(trainer.model, val_loader, t) for t in thresholds}
        info = self._train(trainer)
        runs = {}
        for t in thresholds:
            started = time.perf_counter()
            ev = self.evaluate_detailed(trainer.model, val_loader, t)
            runs[t] = {**ev, **info, "eval_time": time.perf_counter() - started,
                       "convergence_speed": (before[t] - ev["perplexity"]) / max(info["epochs"], 1e-9)}
        return runs

    def best_run(self) -> dict[str, Any] | None:
        """The run config that trained the best result, as ``ponder train`` takes it (its steps, the base seed; the
        report's ``run``), or None. In sweep mode that training ran at ``train_threshold``: ``ponder train`` of this
        config reproduces the model, to be evaluated or served at ``best_config["threshold"]``."""
        if self.best_config is None or self._data is None:
            return None
        best = next(r for r in self.results if r["threshold"] == self.best_config["threshold"]
                    and r["lambda"] == self.best_config["lambda"])
        run = self.run_config(best.get("train_threshold", best["threshold"]), best["lambda"], steps=best["steps"],
                              batch_size=self._data.batch_size, seq_len=self._data.seq_len)
        return run.to_json()

    # -- output ------------------------------------------------------------------------------------------------

    def save_results(self, path: str | Path) -> Path:
        if self.best_config is None:
            raise ConfigError("no results yet: run grid_search (or pareto_search) first")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.report(), indent=2) + "\n")
        return path

    def plot_results(self, save_path: str | Path) -> Path:
        """Three heat maps over threshold × lambda (perplexity, layers, score), a white star on the best cell."""
        from ponder.tune.plots import plot_heatmaps

        if self.best_config is None:
            raise ConfigError("no results yet: run grid_search first")
        return plot_heatmaps(self.results, self.best_config, save_path, self.meta.get("score_metric", "score"))

    def plot_pareto(self, save_path: str | Path) -> Path:
        """Perplexity against avg layers executed for every result, the Pareto front drawn."""
        from ponder.tune.plots import plot_pareto

        return plot_pareto(self.results, self.best_config, save_path, self.n_layers)


def run_act_hyperparameter_tuning(data_path: str | Path | None = None, batch_size: int | None = None,
                                  num_epochs: int = DEFAULT_EPOCHS, output_dir: str | Path = DEFAULT_OUTPUT_DIR, *,
                                  threshold_values: Sequence[float] = DEFAULT_THRESHOLDS,
                                  lambda_values: Sequence[float] = DEFAULT_LAMBDAS,
                                  score_metric: str | Callable = "balanced", mode: str = "sweep",
                                  search: str = "grid", n_trials: int = DEFAULT_TRIALS, seeds: int = 1,
                                  storage: str | None = None, study_name: str | None = None,
                                  d_model: int | None = None, n_layers: int | None = None, n_seq: int | None = None,
                                  max_steps: int | None = None, max_eval_batches: int | None = None,
                                  device: str = "cpu", progress: bool = True,
                                  train_threshold: float | None = None,
                                  heartbeat_interval: int = HEARTBEAT_INTERVAL,
                                  grace_period: int | None = None, run: RunConfig | None = None) -> dict[str, Any]:
    """Load data, tune, and write ``act_tuning_results.json``, ``act_tuning_heatmap.png`` (grid search)
    and ``act_tuning_pareto.png`` into ``output_dir``; returns the results.

    ``data_path=None``: the embedded corpus, or with ``run`` the run's ``[data]``. ``batch_size`` (default 32) and
    ``n_seq`` (the sequence length, default 128) default to the run's ``train.batch_size`` and ``train.seq_len``
    when ``run`` is given; ``d_model`` and ``n_layers`` shape the model only without ``run``. Several workers may
    share one ``storage`` (see ``ACTHyperparameterTuner.grid_search``)."""
    check_choice(search, SEARCHES, "search")
    check_grid(threshold_values, lambda_values, num_epochs)
    resolve_score(score_metric)
    if run is not None:
        batch_size = batch_size or run.train.batch_size
        n_seq = n_seq or run.train.seq_len
    batch_size, n_seq = batch_size or DEFAULT_BATCH_SIZE, n_seq or DEFAULT_SEQ_LEN
    if batch_size < 1 or n_trials < 1 or seeds < 1 or (max_steps is not None and max_steps < 1):
        raise ConfigError("batch size, trials, seeds and steps must be >= 1")
    storage = open_storage(storage, heartbeat_interval, grace_period)  # before any data is read or model trained
    data = run.data if run is not None and data_path is None else data_config(data_path)
    corpus = prepare_data(data)
    train_loader, val_loader = loaders_for(corpus, batch_size, n_seq)
    shape = {"d_model": d_model, "n_layers": n_layers} if run is not None else {
        "d_model": d_model, "n_layers": n_layers, "n_seq": n_seq}
    tuner = ACTHyperparameterTuner(corpus.tokenizer.vocab_size, **shape, run=run, max_steps=max_steps,
                                   max_eval_batches=max_eval_batches, device=device, progress=progress)
    common = {"num_epochs": num_epochs, "score_metric": score_metric, "seeds": seeds, "storage": storage,
              "study_name": study_name, "heartbeat_interval": heartbeat_interval, "grace_period": grace_period}
    if search == "grid":
        tuner.grid_search(train_loader, val_loader, threshold_values, lambda_values, mode=mode,
                          train_threshold=train_threshold, **common)
    else:
        tuner.pareto_search(train_loader, val_loader, n_trials, (min(threshold_values), max(threshold_values)),
                            (min(lambda_values), max(lambda_values)), **common)
    tuner.meta["data"] = describe_data(data_path if data_path is not None or run is None else data)
    if tuner.meta.get("run") is not None:  # the data this tuning read: `ponder train` on that run reproduces a cell
        tuner.meta["run"]["data"] = dataclasses.asdict(data)
    results = tuner.report()
    out = Path(output_dir)
    tuner.save_results(out / "act_tuning_results.json")
    if search == "grid":
        tuner.plot_results(out / "act_tuning_heatmap.png")
    tuner.plot_pareto(out / "act_tuning_pareto.png")
    return results
