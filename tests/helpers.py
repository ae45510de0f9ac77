"""Helpers shared by the tests: run the real ``ponder`` CLI in a separate process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_ponder(*args: str, paths=(), env=None, check=True, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    """Run the real ``ponder`` CLI in a separate process (in folder ``cwd``), with ``paths`` on PYTHONPATH."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PONDER_")}
    full_env["PYTHONPATH"] = os.pathsep.join(str(p) for p in paths)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "ponder", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"ponder {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def listing(*args: str, **kwargs) -> dict:
    return json.loads(run_ponder("plugins", "list", "--json", *args, **kwargs).stdout)


def write_tiny_config(folder, *, steps=8, halting='name = "act"', extra="", text_chars=20_000):
    """A tiny run config (and a small text corpus cut from the embedded one) that trains in seconds."""
    from pathlib import Path

    from ponder.data import embedded_corpus

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text(embedded_corpus()[:text_chars])
    config = folder / "tiny.toml"
    config.write_text(f"""
[model]
d_model = 32
n_layers = 3
n_heads = 2
n_local_heads = 1
d_ff = 64
max_seq_len = 32
attn_window = 8.0
act_threshold = 0.9

[halting]
{halting}

[optimizer]
name = "adamw"
lr = 0.003

[data]
source = "text"
path = "{corpus}"

[train]
steps = {steps}
batch_size = 4
seq_len = 32
warmup_steps = 2
eval_every = 4
eval_batches = 2
log_every = 2
checkpoint_every = 4
seed = 3
{extra}
""")
    return config


def servers_on(repository: Path) -> list[int]:
    """Processes still serving ``repository`` (there must be none once the demo has returned)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in cmdline and str(repository).encode() in cmdline:
            found.append(int(proc.name))
    return found


# the tuner's tests: a model small enough to train twice in a second
TINY_TUNER = {"d_model": 16, "n_layers": 3, "n_seq": 16}


def tiny_tuner(vocab_size):
    from ponder.tune import ACTHyperparameterTuner

    return ACTHyperparameterTuner(vocab_size, TINY_TUNER["d_model"], TINY_TUNER["n_layers"], TINY_TUNER["n_seq"],
                                  max_steps=2, max_eval_batches=2)


def wait_for(condition, timeout=20.0, what="condition", every=0.005):
    """Poll ``condition`` until it holds; an AssertionError naming ``what`` after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)
