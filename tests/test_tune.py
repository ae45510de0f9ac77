"""The ACT tuner (seed 004): grid/sweep/full on Optuna, resume from a storage, scores, files, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import run_ponder

TINY = {"d_model": 16, "n_layers": 3, "n_seq": 16}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices on busy cores: one intra-op thread is several times faster than two fighting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from ponder.data import embedded_corpus

    path = tmp_path_factory.mktemp("tune") / "corpus.txt"
    path.write_text(embedded_corpus()[:12_000])
    return path


@pytest.fixture(scope="module")
def loaders(corpus):
    from ponder.tune import make_loaders

    return make_loaders(corpus, batch_size=4, n_seq=TINY["n_seq"])


def _tuner(vocab_size):
    from ponder.tune import ACTHyperparameterTuner

    return ACTHyperparameterTuner(vocab_size, TINY["d_model"], TINY["n_layers"], TINY["n_seq"], max_steps=2,
                                  max_eval_batches=2)


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


@pytest.mark.parametrize("flags, message", [
    (["--thresholds", "0.5", "1.5"], "outside (0, 1]"),
    (["--lambdas", "-0.1"], "negative"),
    (["--score-metric", "speed"], "unknown --score-metric"),
    (["--epochs", "0"], "--epochs must be >= 1"),
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
