"""Helpers shared by the tests: run the real ``ponder`` CLI in a separate process."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_ponder(*args: str, paths=(), env=None, check=True) -> subprocess.CompletedProcess:
    """Run the real ``ponder`` CLI in a separate process, with ``paths`` on PYTHONPATH."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PONDER_")}
    full_env["PYTHONPATH"] = os.pathsep.join(str(p) for p in paths)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "ponder", *args], capture_output=True, text=True,
                          env=full_env, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"ponder {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def listing(*args: str, **kwargs) -> dict:
    return json.loads(run_ponder("plugins", "list", "--json", *args, **kwargs).stdout)
