"""``ponder demo`` end to end, shortened: a tiny model, a few steps, through the same code path as `make demo`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_ponder, servers_on, write_tiny_config

from ponder.errors import PonderError


def _demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PONDER_")}
    return subprocess.run(
        [sys.executable, "-m", "ponder", "demo", "--config", str(tmp_path / "tiny.toml"), "--run-dir",
         str(tmp_path / "run"), "--repository", str(tmp_path / "models"), "--name", "tiny", "--requests", "3",
         "--warmup", "1", "--no-progress", *args],
        capture_output=True, text=True, env=env, timeout=600)


def test_demo_trains_exports_serves_measures_and_stops(tmp_path):
    config = write_tiny_config(tmp_path, steps=6)
    config.write_text(config.read_text().replace("n_layers = 3", "n_layers = 2"))  # the export traces each layer
    first = _demo(tmp_path)
    assert first.returncode == 0, first.stderr
    out = first.stdout
    for step in ("[1/4] training the demo model", "[2/4] exporting", "[3/4] started `ponder serve",
                 "[4/4] 3 validation sequences", "stopped the server"):
        assert step in out
    assert "Traceback" not in first.stderr

    # the table: one row per threshold, the columns
    header = next(line for line in out.splitlines() if line.lstrip().startswith("threshold"))
    for column in ("layers executed", "mean token depth", "p50 ms", "speed-up", "perplexity"):
        assert column in header
    scoring, generation = out.split("generation through the KV cache")
    for part in (scoring, generation):  # the scoring table, then generation tokens/s per threshold
        table = [line.split() for line in part.splitlines() if line.split() and line.split()[0] in
                 {"0.5", "0.8", "0.9", "0.95", "0.99", "1"}]
        assert [row[0] for row in table] == ["0.5", "0.8", "0.9", "0.95", "0.99", "1"]

    run = tmp_path / "run"
    report = json.loads((run / "demo.json").read_text())
    rows = report["rows"]
    assert [r["threshold"] for r in rows] == [0.5, 0.8, 0.9, 0.95, 0.99, 1.0]
    assert rows[-1]["layers_executed"] == report["n_layers"] == 2 and rows[-1]["speedup"] == 1.0
    for r in rows:
        assert r["requests"] == 3 and r["p50_ms"] > 0 and 1.0 < r["perplexity"] < 300
        assert 1 <= r["mean_token_depth"] <= r["layers_executed"] <= 2
    assert report["via"] == "grpc" and report["address"].startswith("127.0.0.1:")
    assert (run / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "models" / "tiny" / "1" / "model.onnx").is_file()
    assert [s["threshold"] for s in report["samples"]] == [0.5, 0.8, 0.9, 0.95, 0.99, 1.0]
    assert all("text" in s and s["tokens_per_s"] > 0 and len(s["token_depth"]) == 32 for s in report["samples"])

    # the server stopped cleanly: exit status 0, and nothing is left serving the repository
    assert report["server_exit_status"] == 0
    with pytest.raises(ProcessLookupError):
        os.kill(report["server_pid"], 0)
    assert servers_on(tmp_path / "models") == []

    # a second run reuses the model and the export, and measures again
    second = _demo(tmp_path)
    assert second.returncode == 0, second.stderr
    assert "reusing the model trained in" in second.stdout and "exported from these very weights" in second.stdout
    assert "exporting" not in second.stdout
    assert sorted(p.name for p in (tmp_path / "models" / "tiny").iterdir()) == ["1"]
    assert json.loads((run / "demo.json").read_text())["server_pid"] != report["server_pid"]
    assert servers_on(tmp_path / "models") == []


def test_an_unfinished_run_is_resumed(tmp_path):
    from ponder.config import load_config
    from ponder.demo import DemoOptions, _train
    from ponder.train import Trainer

    config = write_tiny_config(tmp_path, steps=4)
    config.write_text(config.read_text().replace("checkpoint_every = 4", "checkpoint_every = 2"))
    run = tmp_path / "run"
    Trainer(load_config(config), run, progress=False).train()
    # as if interrupted after step 2: the last checkpoint never got written
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    (run / "latest").write_text("step-00000002")
    said: list[str] = []
    ckpt = _train(DemoOptions(run_dir=run, config=config, progress=False), load_config(config), said.append)
    assert said[0].startswith(f"[1/4] resuming {run} from step 2 to 4")
    assert ckpt.name == "step-00000004"

    # a run trained from another config is not reused in silence
    other = tmp_path / "other.toml"
    other.write_text(config.read_text().replace("n_layers = 3", "n_layers = 2"))
    with pytest.raises(PonderError, match=r"holds a run whose config differs from the one asked for \(in model\); "
                                          "pass --fresh"):
        _train(DemoOptions(run_dir=run, config=other, progress=False), load_config(other), said.append)


def test_fresh_refuses_to_delete_what_the_demo_did_not_write(tmp_path):
    write_tiny_config(tmp_path)
    precious = tmp_path / "run"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    proc = _demo(tmp_path, "--fresh")
    assert proc.returncode == 2
    assert "--fresh would delete" in proc.stderr and "not a ponder run folder" in proc.stderr
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_fresh_with_a_bad_config_deletes_nothing(tmp_path):
    config = write_tiny_config(tmp_path, steps=2)
    from ponder.config import load_config
    from ponder.train import Trainer

    Trainer(load_config(config), tmp_path / "run", progress=False).train()
    (tmp_path / "bad.toml").write_text("[model]\nn_layers = 'many'\n")
    proc = _demo(tmp_path, "--fresh", "--config", str(tmp_path / "bad.toml"))
    assert proc.returncode == 2 and "n_layers" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "run" / "latest").is_file()


def test_demo_bad_input_is_refused_before_any_work(tmp_path):
    proc = run_ponder("demo", "--run-dir", str(tmp_path / "run"), "-t", "0", check=False)
    assert proc.returncode == 2 and "--thresholds: 0.0 is outside (0, 1]" in proc.stderr
    proc = run_ponder("demo", "--run-dir", str(tmp_path / "run"), "--top-p", "0", check=False)
    assert proc.returncode == 2 and "--top-p = 0.0 is outside (0, 1]" in proc.stderr
    proc = run_ponder("demo", "--run-dir", str(tmp_path / "run"), "--steps", "0", check=False)
    assert proc.returncode == 2 and "--steps must be >= 1" in proc.stderr
    assert not (tmp_path / "run").exists()
    with pytest.raises(PonderError, match=r"--name '\.\./up' is not a model name: use ASCII letters"):
        from ponder.demo import DemoOptions, run_demo

        run_demo(DemoOptions(run_dir=tmp_path / "run", name="../up"), say=lambda line: None)
