"""Shared fixtures: real third-party plugin distributions, installed once per session."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DISTS = Path(__file__).parent / "plugin_dists"


@pytest.fixture(scope="session")
def plugin_dists(tmp_path_factory) -> dict[str, Path]:
    """Each distribution under tests/plugin_dists, pip-installed into its own --target folder."""
    out = {}
    for src in sorted(DISTS.iterdir()):
        target = tmp_path_factory.mktemp(src.name)
        build = tmp_path_factory.mktemp(src.name + "-src") / src.name
        shutil.copytree(src, build)  # keep build droppings out of the source tree
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
             "--no-index", "--target", str(target), str(build)],
            check=True, capture_output=True, text=True,
        )
        out[src.name] = target
    return out
