"""The trainer: plugins from the config, controllers at their events, metrics, checkpoints, exact resume."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ponder import checkpoint, distributed, registry
from ponder.config import RunConfig, check_config, parse_config
from ponder.contracts.controllers import EVENTS, TrainingEvent, dispatch, owns_lr
from ponder.contracts.norms import parameter_groups, required_controllers
from ponder.data import Corpus, TokenChunks, epoch_order, prepare_data, tokenizer_from_json
from ponder.errors import CheckpointError, ConfigError, PonderError
from ponder.evaluate import evaluate
from ponder.model import PonderLM, build_model

__all__ = ["EVENTS", "Trainer", "TrainingEvent", "build_model", "build_optimizer", "resolve_device", "train"]


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when a GPU is visible, else the CPU; asking for a missing GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name!r} but no CUDA GPU is visible; use 'cpu' or 'auto'")
    return device


def build_optimizer(run: RunConfig, model: PonderLM) -> torch.optim.Optimizer:
    """The run's optimizer over ``model``'s trainable parameters; a norm's parameters that ask for their own
    learning rate (``ScaledLearningRates``, DyT's alpha) get a group at that multiple of the optimizer's."""
    groups = parameter_groups(model)
    params = groups[0]["params"] if len(groups) == 1 else groups
    optimizer = registry.create("optimizer", run.optimizer.name, params, **run.optimizer.params)
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
    return optimizer


class Trainer:
    """Trains one run into ``out_dir``; ``resume=True`` continues from its latest checkpoint exactly.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) it trains with DistributedDataParallel: ``train.batch_size`` is the
    global batch, each rank takes its share of every batch, and only rank 0 writes checkpoints, metrics and the
    progress bar. The loss the controllers see and the figures logged are averaged over ranks.

    ``out_dir=None`` trains in memory: no checkpoints, no metrics file, no folder; ``save()`` and
    ``metrics_path`` give None. ``corpus`` is data already prepared (a tokenizer and the ``train`` and ``valid``
    token ids, e.g. from ``prepare_data``): it is used instead of reading ``run.data``, so that many trainings
    (the tuner's) read their data once.
    """

    def __init__(self, run: RunConfig | None, out_dir: str | Path | None, *, resume: bool = False,
                 progress: bool = True, steps: int | None = None, device: str | None = None,
                 corpus: Corpus | None = None) -> None:
        if out_dir is None and resume:
            raise ConfigError("resuming needs the run's folder; a run trained in memory (out_dir=None) has none")
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.progress = progress
        state: dict[str, Any] | None = None
        self.notes: list[str] = []
        if resume:
            ckpt, (saved, state, model_state), notes = checkpoint.read_for_resume(self.out_dir)
            self.notes += notes
            saved_run = parse_config(saved["run"])
            if run is not None and run.to_json() != saved_run.to_json():
                diff = sorted(k for k, v in run.to_json().items() if saved_run.to_json()[k] != v and k != "train")
                if diff:
                    raise ConfigError(f"--resume with a config that differs from the run's in {', '.join(diff)}; "
                                      "resume with the run's own config (omit --config)")
            run = saved_run if run is None else dataclasses.replace(saved_run, train=run.train)
            tokenizer = tokenizer_from_json(saved["tokenizer"])
        else:
            if run is None:
                raise ConfigError("no run config given")
            if self.out_dir is not None and (self.out_dir / "latest").exists():
                raise ConfigError(f"{str(self.out_dir)!r} already holds a run; pass --resume to continue it, "
                                  "or choose another output folder")
            tokenizer = None
        if steps is not None:
            run = dataclasses.replace(run, train=dataclasses.replace(run.train, steps=steps))
        if device is not None:
            run = dataclasses.replace(run, train=dataclasses.replace(run.train, device=device))
        check_config(run)
        self.run = run
        self.dist, device_name = distributed.from_env(run.train.device)
        distributed.check_split(run.train.batch_size, self.dist.world_size)
        if not resume and self.dist.is_main and self.out_dir is not None:  # before the data is read: fail fast
            problem = checkpoint.folder_problem(self.out_dir)
            if problem:
                raise PonderError(f"cannot write the run into {str(self.out_dir)!r}: {str(problem[0])!r} {problem[1]}; "
                                  "choose another --out")
        self.corpus: Corpus = prepare_data(run.data, tokenizer) if corpus is None else corpus
        if {"train", "valid"} - set(self.corpus.splits):
            raise ConfigError(f"the corpus given has splits {sorted(self.corpus.splits)}; training needs 'train' "
                              "and 'valid'")
        t = run.train
        self.train_chunks = TokenChunks(self.corpus.splits["train"], t.seq_len)
        self.valid_chunks = TokenChunks(self.corpus.splits["valid"], t.seq_len)
        self.steps_per_epoch = len(self.train_chunks) // t.batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(f"the training split has {len(self.train_chunks)} sequences of {t.seq_len} tokens, "
                              f"fewer than one batch of {t.batch_size}")
        self.device = resolve_device(device_name)
        torch.manual_seed(t.seed)
        self.model = build_model(run, self.corpus.tokenizer.vocab_size).to(self.device)
        self.optimizer = build_optimizer(run, self.model)
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.controllers = [registry.create("controller", c.name, **c.params) for c in run.controllers]
        for name in required_controllers(self.model, [registry.normalize_name(c.name) for c in run.controllers]):
            self.controllers.append(registry.create("controller", name))
            self.notes.append(f"the model's norms need the {name!r} controller (their training_controller): added it")
        self.step = 0
        self._log: Callable[[str], None] = print
        if state is not None:
            self._restore(model_state, state)
        self.ddp: torch.nn.Module = self.model
        if self.dist.enabled:
            # layers past the point where the whole global batch halted get no gradient: unused parameters
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True, **distributed.no_buffer_sync())
            self.model.sync_halting = self.dist.all_true

    # -- state ---------------------------------------------------------------------------------------

    def _restore(self, model_state: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(model_state)
            self.optimizer.load_state_dict(state["optimizer"])
            self.model.dials.load_state_dict(state["dials"])
            if len(state["controllers"]) != len(self.controllers):
                raise CheckpointError("the checkpoint's controllers do not match the run config")
            for ctrl, ctrl_state in zip(self.controllers, state["controllers"], strict=True):
                ctrl.load_state_dict(ctrl_state)
            torch.set_rng_state(state["rng"]["torch"])
            if self.device.type == "cuda" and "cuda" in state["rng"]:
                torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
            self.step = int(state["step"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(f"checkpoint does not fit this model: {exc}") from None
        self._trim_metrics()

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "dials": self.model.dials.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "controllers": [c.state_dict() for c in self.controllers],
            "rng": {"torch": torch.get_rng_state(),
                    **({"cuda": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {})},
        }

    def save(self) -> Path | None:
        """Write a checkpoint of this step into ``out_dir``; in memory (``out_dir=None``) nothing, and None."""
        if self.out_dir is None:
            return None
        config = {"run": self.run.to_json(), "tokenizer": self.corpus.tokenizer.to_json(),
                  "vocab_size": self.corpus.tokenizer.vocab_size}
        return checkpoint.save_checkpoint(self.out_dir, self.step, config=config, model_state=self.model.state_dict(),
                                          trainer_state=self._trainer_state(), keep=self.run.train.keep_checkpoints)

    # -- metrics ---------------------------------------------------------------------------------------

    @property
    def metrics_path(self) -> Path | None:
        """``out_dir/metrics.jsonl``; None in memory (``out_dir=None``), where no record is written."""
        return None if self.out_dir is None else self.out_dir / "metrics.jsonl"

    def _trim_metrics(self) -> None:
        """On resume, drop records past the checkpoint so the log reads as one run."""
        if not self.dist.is_main or self.metrics_path is None or not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= self.step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def _plugin_metrics(self) -> dict[str, Any]:
        """What plugins report of themselves: ``optimizer.metrics()`` and each norm's ``metrics()``
        (e.g. DAG's shrink and alphas, DyT's alpha), when they define it."""
        out: dict[str, Any] = {}
        if callable(getattr(self.optimizer, "metrics", None)):
            out["optimizer"] = self.optimizer.metrics()
        norms = {name: m.metrics() for name, m in self.model.named_modules()
                 if name and callable(getattr(m, "metrics", None))}
        if norms:
            out["norms"] = norms
        return out

    def _record(self, record: dict[str, Any]) -> None:
        if self.metrics_path is None:  # in memory
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    # -- the loop ---------------------------------------------------------------------------------------

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.run.train
        epoch, i = divmod(step, self.steps_per_epoch)
        if getattr(self, "_order_epoch", None) != epoch:
            self._order, self._order_epoch = epoch_order(len(self.train_chunks), t.seed, epoch), epoch
        share = t.batch_size // self.dist.world_size  # this rank's rows of the global batch
        start = i * t.batch_size + self.dist.rank * share
        x, y = self.train_chunks.batch(self._order[start: start + share])
        return x.to(self.device), y.to(self.device)

    def _event(self, name: str, loss: float, metrics: dict[str, Any] | None = None) -> None:
        dispatch(self.controllers, TrainingEvent(name, self.step, loss, self.model, self.optimizer,
                                                 self.run.train.steps, metrics or {}, self._log))

    def validate(self) -> dict[str, Any]:
        """Validation metrics; with several ranks, rank 0 measures and every rank receives its figures."""
        t = self.run.train
        result = None
        if self.dist.is_main:
            result = evaluate(self.model, self.valid_chunks, batch_size=t.batch_size, max_batches=t.eval_batches)
        return self.dist.broadcast(result)

    def train(self) -> dict[str, Any]:
        """Run to ``train.steps``; returns the final validation metrics."""
        from tqdm import tqdm

        t = self.run.train
        main = self.dist.is_main
        if main and self.out_dir is not None:
            try:
                self.out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise PonderError(f"cannot write the run into {str(self.out_dir)!r}: {exc.strerror or exc}; choose "
                                  "another --out") from None
        self.model.train()
        window: dict[str, float] = {"loss": 0.0, "ce": 0.0, "layers": 0.0, "depth": 0.0, "n": 0.0}
        tokens_per_step = t.batch_size * t.seq_len
        started = time.perf_counter()
        bar = tqdm(total=t.steps, initial=self.step, desc="train", unit="step", disable=not (self.progress and main),
                   dynamic_ncols=True)
        self._log = (lambda line: tqdm.write(line, file=sys.stderr)) if main else (lambda line: None)
        # an LR-schedule controller owns the learning rate; otherwise the trainer's linear warm-up does
        own_warmup = not owns_lr(self.controllers)
        self._event("on_train_start", math.nan)
        final: dict[str, Any] = {}
        try:
            while self.step < t.steps:
                if own_warmup and self.step < t.warmup_steps:
                    for group in self.optimizer.param_groups:
                        group["lr"] = group["initial_lr"] * (self.step + 1) / t.warmup_steps
                x, y = self._batch(self.step)
                out = self.ddp(x, y)
                out.loss.backward()
                # one all-reduce: the global batch's loss, cross-entropy and mean token depth (the layers run
                # are global already: every rank ran until the whole batch halted)
                loss, ce, depth = self.dist.mean([out.loss.detach().item(), out.ce.detach().item(),
                                                  float(out.depth.float().mean())])
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {self.step}; lower the learning rate")
                self._event("after_backward", loss)
                if t.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self._event("after_step", loss)
                for key, value in (("loss", loss), ("ce", ce), ("layers", out.layers_executed), ("depth", depth),
                                   ("n", 1)):
                    window[key] += value
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    elapsed = time.perf_counter() - started
                    n = window["n"]
                    record = {"step": self.step, "split": "train", "loss": window["loss"] / n,
                              "perplexity": math.exp(min(window["ce"] / n, 50.0)),
                              "layers_executed": window["layers"] / n, "mean_token_depth": window["depth"] / n,
                              "lr": self.optimizer.param_groups[0]["lr"],
                              "tokens_per_s": n * tokens_per_step / max(elapsed, 1e-9),
                              "dials": self.model.dials.snapshot(), **self._plugin_metrics()}
                    if main:
                        self._record(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", ppl=f"{record['perplexity']:.2f}",
                                    layers=f"{record['layers_executed']:.2f}", refresh=False)
                    window = dict.fromkeys(window, 0.0)
                    started = time.perf_counter()
                if self.step % t.eval_every == 0 or self.step == t.steps:
                    final = {"step": self.step, "split": "valid", **self.validate()}
                    if main:
                        self._record(final)
                    self._event("after_eval", final["loss"], final)
                if main and (self.step % t.checkpoint_every == 0 or self.step == t.steps):
                    self.save()
        finally:
            bar.close()
        if not final:  # resumed at the last step: nothing left to train
            final = {"step": self.step, "split": "valid", **self.validate()}
        return final


def train(run: RunConfig | None, out_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Train (or, with ``resume=True``, continue) a run; returns the final validation metrics."""
    return Trainer(run, out_dir, **kwargs).train()
