"""The examples run as a user would run them (shortened)."""

from __future__ import annotations

import json
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
