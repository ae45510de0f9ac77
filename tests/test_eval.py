"""``ponder eval``: perplexity, layers executed and token depth per threshold, as a table, JSON and a PNG."""

from __future__ import annotations

import json

import pytest
from helpers import run_ponder, write_tiny_config

from ponder.config import load_config
from ponder.evaluate import evaluate_checkpoint
from ponder.train import Trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    Trainer(load_config(write_tiny_config(folder, steps=8)), folder / "run", progress=False).train()
    return folder / "run"


def test_eval_per_threshold_counts_layers(trained):
    results = evaluate_checkpoint(str(trained), [0.1, 0.9, 1.0])
    assert [r["threshold"] for r in results] == [0.1, 0.9, 1.0]
    full = results[-1]
    assert full["layers_executed"] == 3 and full["mean_token_depth"] == 3
    assert full["depth_histogram"] == [0, 0, full["tokens"]]
    for r in results:
        assert 1 <= r["mean_token_depth"] <= r["layers_executed"] <= 3
        assert sum(r["depth_histogram"]) == r["tokens"]
    assert results[0]["mean_token_depth"] <= results[1]["mean_token_depth"] <= 3


def test_eval_cli_table_json_and_png(trained, tmp_path):
    proc = run_ponder("eval", str(trained), "-t", "0.5", "1.0", "--output-dir", str(tmp_path))
    lines = proc.stdout.splitlines()[1:]
    assert lines[0].split() == ["threshold", "perplexity", "layers", "executed", "mean", "token", "depth", "of"]
    assert lines[2].split()[0] == "1" and lines[2].split()[2:4] == ["3.00", "3.00"]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert [r["threshold"] for r in report["results"]] == [0.5, 1.0]
    png = (tmp_path / "eval.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    data = json.loads(run_ponder("eval", str(trained), "--json", "--batches", "3", "--batch-size", "1",
                                 "--output-dir", str(tmp_path)).stdout)
    assert data["results"][0]["threshold"] == 0.9 and data["results"][0]["batches"] == 3
    assert data["results"][0]["tokens"] == 3 * 32


@pytest.mark.parametrize(("args", "message"), [
    (("-t", "1.5"), "act_threshold = 1.5 is outside (0, 1]"),
    (("-t", "0"), "act_threshold = 0.0 is outside (0, 1]"),
    (("--batches", "0"), "--batches must be >= 1"),
    (("--batch-size", "-2"), "--batch-size must be >= 1, got -2"),
])
def test_eval_bad_input_is_one_line(trained, args, message):
    proc = run_ponder("eval", str(trained), *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_eval_of_something_that_is_not_a_checkpoint(tmp_path):
    proc = run_ponder("eval", str(tmp_path), check=False)
    assert proc.returncode == 2 and "is not a ponder checkpoint or run folder" in proc.stderr
