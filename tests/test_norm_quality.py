"""benchmarks/norm_quality.py at a few steps: its JSON, plot and errors (`make bench` gives the figures)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "norm_quality.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_a_short_run_writes_the_summary_curves_and_plot(tmp_path):
    out = tmp_path / "nq.json"
    proc = run("--steps", "4", "--eval-every", "2", "--seeds", "0", "--norms", "layernorm", "dyt", "--workers", "1",
               "--set", "norm.bias=false", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert [r["norm"] for r in report["runs"]] == ["layernorm", "dyt"]
    assert all([p["step"] for p in r["curve"]] == [2, 4] for r in report["runs"])
    assert report["overrides"] == {"norm.bias": False}
    dyt = report["summary"]["dyt"]
    ratio = dyt["perplexity_mean"] / report["summary"]["layernorm"]["perplexity_mean"]
    assert abs(dyt["perplexity_ratio_to_layernorm"] - ratio) < 1e-12
    assert isinstance(dyt["goal_perplexity_met"], bool) and "goal_perplexity_met" not in report["summary"]["layernorm"]
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "dyt" in proc.stdout and "wrote" in proc.stdout


def test_bad_settings_are_named_before_any_training(tmp_path):
    for args, message in ((["--set", "norm.bogus=1"], "has no parameter 'bogus'"),
                          (["--set", "nokey"], "KEY=VALUE"),
                          (["--embed-scale", "big"], "--embed-scale must be a number or 'off'"),
                          (["--norms", "nonorm"], "unknown norm(s) ['nonorm']")):
        proc = run(*args, "--out", str(tmp_path / "x.json"))
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.json").exists()
