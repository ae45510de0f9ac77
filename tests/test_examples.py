"""The examples run as a user would run them (shortened)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_digits_dyt_example(tmp_path):
    pytest.importorskip("sklearn", reason="the example needs scikit-learn (ponder[examples])")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "digits_dyt.py"), "--epochs", "2",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "DyT: replaced 3 BatchNorm layers" in proc.stdout
    results = json.loads((tmp_path / "digits_dyt.json").read_text())
    assert set(results) == {"BatchNorm", "DyT"}
    assert len(results["DyT"]["alpha"]) == 3 and all(len(a) == 2 for a in results["DyT"]["alpha"].values())
    assert results["BatchNorm"]["test_accuracy"][-1] > 0.5  # it learns something in two epochs
    assert (tmp_path / "digits_dyt.png").read_bytes()[:4] == b"\x89PNG"


def test_hf_tiny_gpt2_example(tmp_path):
    pytest.importorskip("transformers", reason="the example needs Hugging Face transformers (ponder[hf])")
    pytest.importorskip("accelerate", reason="the HF Trainer needs accelerate (ponder[hf])")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "hf_tiny_gpt2.py"), "--steps", "10",
                           "--out", str(tmp_path), "--no-progress"], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    assert "DyT: replaced 5 LayerNorm layers" in proc.stdout
    assert "ln_1 is DynamicTanh, logits identical: True" in proc.stdout
    summary = json.loads((tmp_path / "hf_tiny_gpt2.json").read_text())
    assert summary["eval_loss_after"] < summary["eval_loss_before"]  # ten steps already help
    assert summary["plain_norm"] == "LayerNorm" and summary["lr_scale_logged"]
    assert (tmp_path / "model" / "config.json").is_file()
