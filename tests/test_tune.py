"""The ACT tuner (seed 004): grid/sweep/full on Optuna, resume from a storage, scores, files, CLI errors, and that
every training is a `ponder train` run. Several workers on one storage: tests/test_tune_workers.py. Shared: the
fixtures corpus, loaders and one_thread (conftest.py), the tiny tuner (helpers.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import TINY_TUNER as TINY
from helpers import run_ponder
from helpers import tiny_tuner as _tuner

pytestmark = pytest.mark.usefixtures("one_thread")


def test_end_to_end_files_and_schema(corpus, tmp_path):
    from ponder import run_act_hyperparameter_tuning

    out = tmp_path / "out"
    results = run_act_hyperparameter_tuning(corpus, batch_size=4, num_epochs=1, output_dir=out,
                                            threshold_values=[0.5, 0.99], lambda_values=[0.001, 0.1],
                                            n_seq=TINY["n_seq"], d_model=16, n_layers=3, max_steps=2,
                                            max_eval_batches=2, seeds=2, progress=False)
    saved = json.loads((out / "act_tuning_results.json").read_text())
    assert saved["best_config"] == results["best_config"]
    assert set(saved["best_config"]) == {"threshold", "lambda"}
    assert saved["mode"] == "sweep" and saved["score_metric"] == "balanced" and saved["n_layers"] == 3
    assert saved["n_trainings"] == 2 * 2  # L lambdas x 2 seeds, not T x L x seeds
    assert "perplexity drop per epoch" in saved["convergence_speed"]
    assert len(saved["all_results"]) == 4
    for r in saved["all_results"]:
        for key in ("threshold", "lambda", "final_val_perplexity", "avg_layers_executed", "mean_token_depth",
                    "training_time", "convergence_speed", "speedup_potential", "score",
                    "final_val_perplexity_std", "avg_layers_executed_std"):
            assert key in r, key
        assert 1.0 <= r["avg_layers_executed"] <= 3.0
        assert 1.0 <= r["mean_token_depth"] <= r["avg_layers_executed"] + 1e-9
        assert r["speedup_potential"] == pytest.approx(3.0 / r["avg_layers_executed"])
        assert r["score"] == pytest.approx(r["final_val_perplexity"] + 10 * r["avg_layers_executed"])
        assert r["training_time_shared_by"] == 2
    assert saved["best_score"] == min(r["score"] for r in saved["all_results"])
    for name in ("act_tuning_heatmap.png", "act_tuning_pareto.png"):
        assert (out / name).stat().st_size > 1000


def test_sweep_trains_per_lambda_full_per_cell(loaders):
    train, val, vocab = loaders
    sweep = _tuner(vocab)
    res = sweep.grid_search(train, val, [0.5, 0.9, 1.0], [0.0, 0.05], num_epochs=1, score_metric="perplexity")
    assert sweep.n_trainings == 2 and len(res["all_results"]) == 6
    full = _tuner(vocab)
    res = full.grid_search(train, val, [0.5, 1.0], [0.05], num_epochs=1, mode="full")
    assert full.n_trainings == 2 and res["mode"] == "full"
    assert all(r["training_time_shared_by"] == 1 for r in res["all_results"])
    # same seed, same data order, same training threshold: a sweep cell reproduces the full cell exactly
    one = _tuner(vocab).grid_search(train, val, [1.0], [0.05], num_epochs=1)
    cell = next(r for r in res["all_results"] if r["threshold"] == 1.0)
    assert one["all_results"][0]["final_val_perplexity"] == pytest.approx(cell["final_val_perplexity"])


def test_resume_skips_finished_trials_and_custom_score(loaders, tmp_path):
    train, val, vocab = loaders
    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    first = _tuner(vocab)
    a = first.grid_search(train, val, [0.5, 0.99], [0.001, 0.1], num_epochs=1, score_metric="perplexity",
                          storage=storage, study_name="t")
    assert first.n_trainings == 2
    again = _tuner(vocab)
    b = again.grid_search(train, val, [0.5, 0.99], [0.001, 0.1], num_epochs=1, score_metric="perplexity",
                          storage=storage, study_name="t")
    assert again.n_trainings == 0 and b["resumed_trials"] == 4
    assert b["best_config"] == a["best_config"]
    assert [r["final_val_perplexity"] for r in b["all_results"]] == [r["final_val_perplexity"]
                                                                     for r in a["all_results"]]

    def worst_perplexity(r):  # a custom score: any callable result -> float, lower is better
        return -r["final_val_perplexity"] - r["lambda"]

    c = again.grid_search(train, val, [0.5, 0.99], [0.001, 0.1], num_epochs=1, score_metric=worst_perplexity,
                          storage=storage, study_name="t")
    assert again.n_trainings == 0 and c["score_metric"] == "worst_perplexity"
    assert c["best_config"] != a["best_config"]


def test_api_pieces_and_pareto(loaders, tmp_path):
    from ponder.errors import DataError
    from ponder.tune import make_loaders, pareto_front

    train, val, vocab = loaders
    tuner = _tuner(vocab)
    model = tuner.create_model(act_threshold=0.8, act_lambda=0.05)
    assert model.halting.act_lambda == 0.05 and model.dials.value("act_threshold") == 0.8
    assert isinstance(tuner.evaluate(model, val), float)
    assert 1.0 <= tuner.evaluate_detailed(model, val, threshold=0.3)["avg_layers_executed"] <= 3.0
    with pytest.raises(DataError, match="does not exist"):
        make_loaders(tmp_path / "missing", 4, 16)
    assert pareto_front([(1, 5), (2, 2), (3, 3), (5, 1)]) == [0, 1, 3]
    res = tuner.pareto_search(train, val, n_trials=2, num_epochs=1)
    assert res["search"] == "pareto" and len(res["all_results"]) == 2 and tuner.n_trainings == 2
    tuner.plot_pareto(tmp_path / "p.png")
    assert (tmp_path / "p.png").exists()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = tuner.train_model(model, train, num_epochs=1, seed=0, val_loader=val)  # in place, through the Trainer
    assert info["steps"] == 2 and tuner.n_trainings == 3
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- every training is a `ponder train` run ---------------------------------------------------------------------


def _toml_run(text):
    import tomllib

    from ponder.config import parse_config

    return parse_config(tomllib.loads(text))


def test_the_tuners_run_config_is_what_ponder_train_parses():
    """Nothing of the tuner's own: the run config of a cell is the one `ponder train` builds from this TOML."""
    from ponder.tune import ACTHyperparameterTuner

    default = ACTHyperparameterTuner(256).run_config(0.9, 0.01, steps=300, batch_size=32, seq_len=128, seed=1)
    assert default.to_json() == _toml_run("""
        [model]
        vocab_size = 256
        d_model = 64
        n_layers = 4
        n_heads = 2
        d_ff = 256
        max_seq_len = 128
        act_threshold = 0.9
        [halting]
        name = "act"
        act_lambda = 0.01
        [train]
        steps = 300
        batch_size = 32
        seq_len = 128
        warmup_steps = 30
        seed = 1
        device = "cpu"
    """).to_json()
    assert (default.model.n_local_heads, default.model.attn_window) == (2, 40.0)  # ponder train's, not the tuner's
    assert default.norm.name == "layernorm" and default.optimizer.to_json() == {"name": "adamw", "lr": 3e-3}
    # a shape where ponder train's defaults cannot hold (1 head, a 16-token context): only those two are set
    tiny = ACTHyperparameterTuner(256, **TINY, lr=1e-3, max_eval_batches=2).run_config(0.5, 0.1, steps=5,
                                                                                        batch_size=4)
    assert tiny.to_json() == _toml_run("""
        [model]
        vocab_size = 256
        d_model = 16
        n_layers = 3
        n_heads = 1
        n_local_heads = 1
        d_ff = 64
        max_seq_len = 16
        attn_window = 16.0
        act_threshold = 0.5
        [halting]
        name = "act"
        act_lambda = 0.1
        [optimizer]
        name = "adamw"
        lr = 1e-3
        [train]
        steps = 5
        batch_size = 4
        seq_len = 16
        warmup_steps = 1
        eval_batches = 2
        device = "cpu"
    """).to_json()


def test_the_reported_run_trained_by_ponder_train_reproduces_the_tuners_cell(corpus, tmp_path):
    """`ponder train` on the report's run config (steps, data and all) gives the tuner's numbers exactly."""
    from ponder.config import parse_config
    from ponder.data import TokenChunks, prepare_data
    from ponder.evaluate import evaluate
    from ponder.train import Trainer
    from ponder.tune import run_act_hyperparameter_tuning

    report = run_act_hyperparameter_tuning(corpus, 4, 1, tmp_path / "out", threshold_values=[0.05, 0.9],
                                           lambda_values=[0.05], score_metric="layers", max_steps=3,
                                           max_eval_batches=2, progress=False, **TINY)
    run = parse_config(report["run"])
    assert run.data.path == str(corpus) and run.train.steps == 3 and run.halting.params == {"act_lambda": 0.05}
    # sweep mode: the best cell's model trained at the highest threshold and is evaluated at its own
    assert report["best_config"]["threshold"] == 0.05 and run.model.act_threshold == 0.9
    trainer = Trainer(run, tmp_path / "run", progress=False)
    trainer.train()
    valid = TokenChunks(prepare_data(run.data).splits["valid"], TINY["n_seq"])
    for cell in report["all_results"]:
        ev = evaluate(trainer.model, valid, batch_size=4, max_batches=2, threshold=cell["threshold"])
        assert ev["perplexity"] == pytest.approx(cell["final_val_perplexity"], rel=1e-6)
        assert ev["layers_executed"] == pytest.approx(cell["avg_layers_executed"])


class RecordingAdamW(torch.optim.AdamW):
    """An optimizer plugin that remembers every instance and counts its steps."""

    made: list = []

    def __init__(self, params, lr: float = 1e-3):
        super().__init__(params, lr=lr)
        self.steps = 0
        RecordingAdamW.made.append(self)

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


class EventLog:
    """A controller that writes down each event with the lambda and threshold of the model it sees."""

    seen: list = []

    def on_train_start(self, event):
        self._log(event)

    def after_step(self, event):
        self._log(event)

    def _log(self, event):
        EventLog.seen.append((event.name, event.model.halting_spec.params["act_lambda"],
                              event.dials.value("act_threshold"), event.total_steps))

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@pytest.fixture
def recording_plugins():
    import types

    from ponder import registry
    from ponder.registry import hookimpl

    RecordingAdamW.made.clear()
    EventLog.seen.clear()
    plugin = types.SimpleNamespace(
        register_optimizers=hookimpl(lambda register: register("recording_adamw", RecordingAdamW,
                                                               description="test optimizer")),
        register_controllers=hookimpl(lambda register: register("event_log", EventLog, description="test")))
    registry.register_plugin(plugin, "test-tune-recording")
    yield
    registry.configure()


def _base_run(corpus, **train):
    from ponder.config import parse_config

    return parse_config({
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_local_heads": 1, "d_ff": 48, "max_seq_len": 32,
                  "attn_window": 8.0},
        "norm": {"name": "rmsnorm"}, "halting": {"name": "act", "act_lambda": 0.5},
        "optimizer": {"name": "recording_adamw", "lr": 0.002}, "controllers": [{"name": "event_log"}],
        "data": {"source": "text", "path": str(corpus)},
        "train": {"seed": 5, "batch_size": 4, "seq_len": 16, "warmup_steps": 3, **train}})


def test_a_base_run_is_tuned_with_its_own_optimizer_plugin_and_controllers(loaders, recording_plugins, corpus):
    from ponder.tune import ACTHyperparameterTuner

    train, val, vocab = loaders
    base = _base_run(corpus)
    tuner = ACTHyperparameterTuner(vocab, run=base, max_steps=2, max_eval_batches=2)
    report = tuner.grid_search(train, val, [0.5, 0.9], [0.01, 0.1], num_epochs=1)
    assert len(RecordingAdamW.made) == tuner.n_trainings == 2  # one training per lambda, each with the plugin
    assert all(opt.steps == 2 and opt.param_groups[0]["initial_lr"] == 0.002 for opt in RecordingAdamW.made)
    # the controller ran at its events, on models with the cell's lambda and the training threshold
    assert EventLog.seen == [(name, lam, 0.9, 2) for lam in (0.01, 0.1)
                             for name in ("on_train_start", "after_step", "after_step")]
    assert report["model"] == {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 48, "max_seq_len": 32,
                               "vocab_size": vocab}
    run = report["run"]
    assert run["norm"] == {"name": "rmsnorm"} and run["controllers"] == [{"name": "event_log"}]
    assert run["train"]["seed"] == 5 and run["train"]["warmup_steps"] == 3 and run["model"]["attn_window"] == 8.0
    assert run["halting"] == {"name": "act", "act_lambda": report["best_config"]["lambda"]}


def test_a_base_run_end_to_end_reads_its_own_data(recording_plugins, corpus, tmp_path):
    from ponder import run_act_hyperparameter_tuning

    base = _base_run(corpus, batch_size=8)
    report = run_act_hyperparameter_tuning(None, num_epochs=1, output_dir=tmp_path, threshold_values=[0.9],
                                           lambda_values=[0.01], max_steps=1, max_eval_batches=1, progress=False,
                                           run=base)
    assert report["data"] == f"{corpus} (bytes)" and report["run"]["train"]["batch_size"] == 8
    assert len(RecordingAdamW.made) == 1 and report["model"]["d_model"] == 32


def test_a_base_run_that_cannot_be_tuned_is_a_clear_error(corpus):
    from ponder.config import parse_config
    from ponder.errors import ConfigError
    from ponder.tune import ACTHyperparameterTuner

    with pytest.raises(ConfigError, match="d_model = 64, but the run config's model has 128"):
        ACTHyperparameterTuner(256, 64, run=parse_config({}))
    with pytest.raises(ConfigError, match="tunes ACT's act_lambda"):
        ACTHyperparameterTuner(256, run=parse_config({"halting": {"name": "fixed"}}))


def test_loaders_over_other_datasets_are_a_clear_error(loaders):
    from torch.utils.data import DataLoader, TensorDataset

    from ponder.errors import ConfigError

    train, val, vocab = loaders
    other = DataLoader(TensorDataset(torch.zeros(8, 16, dtype=torch.long)), batch_size=4)
    with pytest.raises(ConfigError, match="batches a TensorDataset.*TokenChunks"):
        _tuner(vocab).grid_search(other, val, [0.9], [0.01], num_epochs=1)


def test_the_trainer_in_memory_writes_nothing_and_reads_the_corpus_given(tmp_path, monkeypatch):
    import dataclasses
    import os

    from helpers import write_tiny_config

    from ponder.config import load_config
    from ponder.data import prepare_data
    from ponder.errors import ConfigError, DataError
    from ponder.train import Trainer

    run = load_config(write_tiny_config(tmp_path / "cfg", steps=4))
    corpus = prepare_data(run.data)
    elsewhere = dataclasses.replace(run, data=dataclasses.replace(run.data, path=str(tmp_path / "gone.txt")))
    with pytest.raises(DataError, match="does not exist"):
        Trainer(elsewhere, None, progress=False)
    monkeypatch.chdir(tmp_path)
    files = sorted(os.walk(tmp_path))
    trainer = Trainer(elsewhere, None, progress=False, corpus=corpus)  # run.data is not read again
    final = trainer.train()
    assert trainer.step == 4 and final["step"] == 4
    assert trainer.save() is None and trainer.metrics_path is None
    assert sorted(os.walk(tmp_path)) == files  # no folder, no checkpoint, no metrics.jsonl
    with pytest.raises(ConfigError, match="in memory"):
        Trainer(None, None, resume=True)


def test_the_parts_import_without_a_cycle_and_the_parser_without_torch():
    code = ("import sys; import ponder.tune.plots, ponder.tune.report, ponder.tune.cli, ponder.tune.claims; "
            "from ponder.tune import pareto_front, DEFAULT_THRESHOLDS, format_table; "
            "assert 'ponder.tune.tuner' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules); "
            "import ponder.tune.tuner, ponder.tune.search, ponder.tune.loaders")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("flags, message", [
    (["--thresholds", "0.5", "1.5"], "outside (0, 1]"),
    (["--lambdas", "-0.1"], "negative"),
    (["--score-metric", "speed"], "unknown --score-metric"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--config", "run.toml", "--d-model", "32"], "with --config the run's [model] is tuned as it is"),
])
def test_cli_bad_flags_are_one_line_errors(flags, message):
    proc = run_ponder("tune", *flags, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("ponder: error:") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_help_imports_neither_torch_nor_optuna():
    code = ("import sys; from ponder.cli import build_parser; build_parser().parse_args(['tune', '--steps', '1']); "
            "import ponder; ponder.__all__; "
            "assert not {'torch', 'optuna'} & set(sys.modules), sorted({'torch', 'optuna'} & set(sys.modules))")
    subprocess.run([sys.executable, "-c", code], check=True)
