"""``ponder bench``: target resolution, the figures it reports, in process and through real gRPC servers."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from helpers import run_ponder, servers_on

from ponder.errors import PonderError
from ponder.serve.bench import Settings, bench_text, resolve_target, run_bench, sequences


def test_resolve_target_from_every_kind_of_path(model_repository, tmp_path):
    repo = model_repository
    by_file = resolve_target(str(repo / "tiny" / "1" / "model.onnx"))
    assert (by_file.name, by_file.version, by_file.repository) == ("tiny", "1", repo)
    assert resolve_target(str(repo / "tiny" / "1")).version == "1"
    assert resolve_target(str(repo / "tiny")).version == "2"  # a model folder: its newest version
    assert resolve_target(str(repo), "tiny").path == repo / "tiny" / "2" / "model.onnx"
    with pytest.raises(PonderError, match=r"holds 2 models \(broken, tiny\): name one, e.g. .*broken"):
        resolve_target(str(repo))  # not `outside`: a link out of the repository, which the server skips too
    with pytest.raises(PonderError, match="has no model 'nope'; it holds"):
        resolve_target(str(repo), "nope")
    lone = tmp_path / "lone.onnx"
    shutil.copy(repo / "tiny" / "1" / "model.onnx", lone)
    assert (resolve_target(str(lone)).name, resolve_target(str(lone)).repository) == ("lone", None)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(PonderError, match="is not an .onnx file"):
        resolve_target(str(tmp_path / "notes.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PonderError, match="holds no exported model"):
        resolve_target(str(tmp_path / "empty"))
    remote = resolve_target("served-name")  # nothing here by that name: a model name on a server
    assert (remote.name, remote.path) == ("served-name", None)


def test_inprocess_figures_are_consistent_and_perplexity_is_the_models(model_repository):
    from ponder.serve.engine import Engine

    target = resolve_target(str(model_repository), "tiny")
    settings = Settings(thresholds=[0.3, 0.6], batch_sizes=[1, 2, 1], requests=6, warmup=1, seq_len=16)
    report = run_bench(target, settings, progress=False)
    rows = report["rows"]
    # each batch size once (1 was given twice), full depth always measured
    assert [(r["batch_size"], r["threshold"]) for r in rows] == [(b, t) for b in (1, 2) for t in (0.3, 0.6, 1.0)]
    n_layers = report["n_layers"]
    for r in rows:
        assert r["requests"] == 6
        assert 1 <= r["mean_token_depth"] <= r["layers_executed"] <= n_layers
        assert r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert r["ideal_speedup"] == pytest.approx(n_layers / r["layers_executed"])
        assert r["throughput_rps"] > 0 and r["tokens_per_s"] == pytest.approx(r["throughput_rps"] * r["batch_size"]
                                                                               * 16)
        if r["threshold"] == 1.0:
            assert r["layers_executed"] == n_layers and r["speedup"] == 1.0
    assert rows[0]["layers_executed"] < n_layers  # the low threshold really exits early on this model

    # the perplexity is the model's own on the same sequences (batch 1: requests 0..5 take rows 0..5)
    engine = Engine(target.path)
    seqs = sequences(engine, bench_text(), 16)[:6]
    nll, count = 0.0, 0
    for row in seqs:
        logits = engine.infer(row[None, :-1], 0.3).logits.astype(np.float64)[0]
        log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        nll -= log_probs[np.arange(16), row[1:]].sum()
        count += 16
    assert rows[0]["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-6)


def test_grpc_with_its_own_server_matches_inprocess_and_leaves_no_process(model_repository):
    target = resolve_target(str(model_repository), "tiny")
    settings = Settings(thresholds=[0.4], batch_sizes=[1], requests=4, warmup=1, seq_len=12)
    local = run_bench(target, settings, progress=False)
    remote = run_bench(target, settings, via="grpc", progress=False, log=lambda line: None)
    assert remote["via"] == "grpc" and remote["address"].startswith("127.0.0.1:")
    assert remote["server_exit_status"] == 0
    for a, b in zip(local["rows"], remote["rows"], strict=True):
        assert (a["threshold"], a["layers_executed"], a["mean_token_depth"]) == \
            (b["threshold"], b["layers_executed"], b["mean_token_depth"])
        assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-6)
        assert b["compute_p50_ms"] > 0


def test_grpc_against_a_running_server_with_concurrency(model_repository):
    from ponder.serve.server import create_server

    server, port = create_server(model_repository, "127.0.0.1:0", workers=2, metrics_port=None)
    server.start()
    try:
        target = resolve_target("tiny")
        settings = Settings(thresholds=[0.5], batch_sizes=[2], concurrency=3, requests=12, warmup=2, seq_len=10)
        report = run_bench(target, settings, address=f"127.0.0.1:{port}", progress=False)
    finally:
        server.stop()
    assert report["via"] == "grpc" and report["concurrency"] == 3
    assert [r["requests"] for r in report["rows"]] == [12, 12]
    assert report["rows"][-1]["layers_executed"] == report["n_layers"] == 3


def test_bench_cli_writes_json_table_and_png(model_repository, tmp_path):
    out = tmp_path / "out"
    proc = run_ponder("bench", str(model_repository), "--model", "tiny", "-t", "0.5", "-b", "1", "-n", "3",
                      "--warmup", "0", "--seq-len", "8", "--out", str(out), "--no-progress")
    assert "speed-up" in proc.stdout and "perplexity" in proc.stdout
    table = [line.split() for line in proc.stdout.splitlines() if line.strip().startswith("1 ")]
    assert [row[1] for row in table] == ["0.5", "1"]
    report = json.loads((out / "bench.json").read_text())
    assert report["model"] == "tiny" and len(report["rows"]) == 2
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp*"))


@pytest.mark.parametrize(("args", "message"), [
    (["-t", "1.5"], "--thresholds: 1.5 is outside (0, 1]"),
    (["-b", "0"], "--batch-sizes must be whole numbers >= 1"),
    (["-n", "0"], "--requests must be >= 1"),
    (["--seq-len", "999"], "--seq-len must be in [2, 32]"),
    (["--address", "127.0.0.1:1", "--via", "inprocess"], "--address is for --via grpc"),
    (["--seq-len", "0"], "--seq-len must be in [2, 32]"),
    (["--tls-ca", "ca.pem"], "--tls-ca is for connecting to a server at --address"),
    (["--address", "127.0.0.1:1", "--threads", "2"], "the server at --address chose its own"),
])
def test_bench_cli_bad_input(model_repository, tmp_path, args, message):
    proc = run_ponder("bench", str(model_repository / "tiny"), "--out", str(tmp_path), "--no-progress", *args,
                      check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "bench.json").exists()


def test_bench_cli_errors_name_what_is_missing(model_repository, tmp_path):
    missing = run_ponder("bench", str(tmp_path / "nothing"), "--no-progress", check=False)
    assert missing.returncode == 2 and "is no file or folder here" in missing.stderr
    lone = tmp_path / "lone.onnx"
    shutil.copy(model_repository / "tiny" / "1" / "model.onnx", lone)
    unserved = run_ponder("bench", str(lone), "--via", "grpc", "--no-progress", check=False)
    assert unserved.returncode == 2 and "needs it in a repository" in unserved.stderr
    unreachable = run_ponder("bench", "tiny", "--address", "127.0.0.1:1", "--no-progress", check=False)
    assert unreachable.returncode == 2 and "cannot reach 127.0.0.1:1" in unreachable.stderr
    assert "Traceback" not in missing.stderr + unserved.stderr + unreachable.stderr


def test_sigterm_to_bench_stops_the_server_it_started(model_repository, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    repo = tmp_path / "repo"
    shutil.copytree(model_repository / "tiny", repo / "tiny")
    bench = subprocess.Popen([sys.executable, "-m", "ponder", "bench", str(repo), "--via", "grpc", "-n", "100000",
                              "--no-progress", "--out", str(tmp_path / "out")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not servers_on(repo) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert servers_on(repo), "the bench never started its server"
        time.sleep(1.0)  # let it measure a little
        bench.send_signal(signal.SIGTERM)
        _, err = bench.communicate(timeout=60)
    finally:
        bench.kill()
    assert bench.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in err
    assert servers_on(repo) == []
    assert not (tmp_path / "out" / "bench.json").exists()  # nothing half-written
