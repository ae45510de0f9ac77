"""Training on several processes (DDP under torchrun, gloo on the CPU): the ranks agree exactly, the run matches
one process with the same global batch, only rank 0 writes, and resume works as in one process."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_ponder, write_tiny_config
from safetensors.torch import load_file

from ponder import checkpoint
from ponder.config import load_config

WORKER = Path(__file__).parent / "ddp_worker.py"
STEPS = 8
SPREAD = "10"  # the halting units' spread: tokens (and so the ranks' halves of a batch) halt at different depths
# Loss and weights of 2 ranks against 1 process with the same global batch: the same sums in another order
# (DDP averages the two halves' gradients), so they differ by float32 rounding only: measured 3.6e-7 for the
# loss and 1.2e-7 for the weights after 8 steps.
LOSS_TOL = 1e-5  # relative: fp32 sums in another order, over 8 steps (ADyT's alpha learns at 10x the lr)
WEIGHT_TOL = 1e-4  # summation order's fp32 noise after 8 steps; ADyT's alphas learn at 10x the lr and spread it


def demo_with(folder: Path) -> Path:
    """The demo model's shape with ADyT, DAG and the autonomic controller, on a small global batch."""
    shape = dataclasses.asdict(load_config(preset="demo").model)
    model = "\n".join(f"{k} = {v!r}" for k, v in shape.items() if k not in ("vocab_size", "act_threshold"))
    path = folder / "ddp.toml"
    path.write_text(f"""
[model]
{model}
act_threshold = 0.9
[norm]
name = "adyt"
[halting]
name = "act"
act_lambda = 0.003
bias_init = 0.0
[optimizer]
name = "dag"
lr = 3e-3
[[controllers]]
name = "autonomic"
[train]
steps = {STEPS}
batch_size = 2
seq_len = 16
warmup_steps = 2
eval_every = 4
eval_batches = 2
checkpoint_every = 4
log_every = 1
""")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory, worker_id):
    """The same run on 2 ranks and in 1 process; each rank's whole state written by tests/ddp_worker.py.
    Made once per test session: the xdist workers share it (the first makes it under a lock, the other reads it)."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        shared = shared.parent
    root = shared / "ddp-runs"
    with FileLock(str(shared / "ddp-runs.lock")):
        if not (root / "done").exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            config = demo_with(root)
            torchrun(2, str(WORKER), str(config), str(root / "two"), SPREAD)
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
            subprocess.run([sys.executable, str(WORKER), str(config), str(root / "one"), SPREAD], check=True,
                           env=env, capture_output=True, timeout=180)
            (root / "done").touch()
    return root


def state(folder: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(str(folder / f"rank{rank}.safetensors")), json.loads((folder / f"rank{rank}.json").read_text())


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_both_ranks_hold_identical_parameters_dials_and_optimizer_state(runs):
    t0, s0 = state(runs / "two", 0)
    t1, s1 = state(runs / "two", 1)
    assert s0["world_size"] == s1["world_size"] == 2 and s0["step"] == STEPS
    assert t0.keys() == t1.keys()
    assert any(k.startswith("optimizer.") for k in t0) and any(k.endswith(".grad_norm") for k in t0)
    different = [k for k in t0 if not torch.equal(t0[k], t1[k])]
    assert not different, different
    # the non-tensor state too: the dials, the controllers (autonomic's running loss, adyt's count), DAG's
    # scalars and metrics (alpha, shrink), the learning rate
    for key in ("dials", "controllers", "param_groups", "metrics"):
        assert s0[key] == s1[key], key
    assert {k: v for k, v in s0.items() if k.startswith("optimizer.")} == \
        {k: v for k, v in s1.items() if k.startswith("optimizer.")}
    # and none of it is trivially equal: the controllers acted and ADyT adapted
    assert s0["dials"]["rope_base"] != 10000.0 and s0["dials"]["attn_window"] != 40.0, s0["dials"]
    assert s0["controllers"][0]["steps"] == STEPS and s0["controllers"][1]["updates"] == STEPS
    assert all(not torch.equal(v, torch.ones(())) for k, v in t0.items() if k.endswith(".grad_norm"))


def test_every_rank_runs_until_the_global_batch_has_halted(runs):
    _, s0 = state(runs / "two", 0)
    _, s1 = state(runs / "two", 1)
    # both ranks took every "stop here?" decision together ...
    assert [g for _, g in s0["halt_calls"]] == [g for _, g in s1["halt_calls"]]
    # ... and at least once one rank's half had halted while the other's had not (the spread makes it happen)
    assert any(local != everywhere for local, everywhere in s0["halt_calls"] + s1["halt_calls"])
    layers = [r["layers_executed"] for r in metrics(runs / "two") if r["split"] == "train"]
    assert min(layers) < 6, layers  # the loop did stop early: the depth is ACT's, not a fixed 6


def test_two_ranks_match_one_process_with_the_same_global_batch(runs):
    two, one = metrics(runs / "two"), metrics(runs / "one")
    assert [(r["step"], r["split"]) for r in two] == [(r["step"], r["split"]) for r in one]
    for a, b in zip(two, one, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_TOL), (a["step"], a["split"])
        assert a["layers_executed"] == b["layers_executed"], a["step"]  # the global figure, not rank 0's
        assert a["mean_token_depth"] == pytest.approx(b["mean_token_depth"], abs=1e-6)
    t2, s2 = state(runs / "two", 0)
    t1, s1 = state(runs / "one", 0)
    assert s1["world_size"] == 1
    assert s2["dials"] == pytest.approx(s1["dials"], rel=1e-12)
    worst = max(float((t2[k] - t1[k]).abs().max()) for k in t1 if k.startswith("model."))
    assert worst < WEIGHT_TOL, worst


def test_only_rank_0_writes(runs):
    folder = runs / "two"
    steps = [(r["step"], r["split"]) for r in metrics(folder)]
    assert len(steps) == len(set(steps)) == STEPS + 2  # one train record per step, two validations: no duplicates
    assert [p.name for p in (folder / "checkpoints").iterdir()] and checkpoint.resolve(folder)
    weights = load_file(str(checkpoint.resolve(folder) / checkpoint.MODEL))
    t0, _ = state(folder, 0)
    assert all(torch.equal(weights[k], t0[f"model.{k}"]) for k in weights)


def test_ponder_train_nproc_resumes_like_a_straight_run(runs, tmp_path):
    """`ponder train --nproc 2 --resume` from the 2-rank run's step-4 checkpoint ends where that run ended."""
    straight, split = runs / "two", tmp_path / "split"
    shutil.copytree(straight, split, ignore=shutil.ignore_patterns("rank*"))
    first, last = sorted(p.name for p in (split / "checkpoints").iterdir())
    shutil.rmtree(split / "checkpoints" / last)
    (split / "latest").write_text(first + "\n")
    resumed = run_ponder("train", "--out", str(split), "--resume", "--nproc=2", "--no-progress",
                         env={"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"})
    assert resumed.stderr.count("training ") == 1 and "x 2 processes" in resumed.stderr
    assert f"from step {STEPS // 2} to {STEPS}" in resumed.stderr and resumed.stdout.count("checkpoint:") == 1
    a = load_file(str(checkpoint.resolve(straight) / checkpoint.MODEL))
    b = load_file(str(checkpoint.resolve(split) / checkpoint.MODEL))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def timeless(folder):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in metrics(folder)]

    assert timeless(split) == timeless(straight)  # one log, as if never interrupted


def test_a_global_batch_that_does_not_split_is_refused_before_any_process_starts(tmp_path):
    config = write_tiny_config(tmp_path, steps=2)  # batch_size 4
    proc = run_ponder("train", "--config", str(config), "--out", str(tmp_path / "run"), "--nproc", "3",
                      check=False)
    assert proc.returncode == 2
    assert "batch_size = 4" in proc.stderr and "multiple of 3" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
