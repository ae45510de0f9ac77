"""The house rules of docs/architecture.md, checked by import-linter against `.importlinter`.

import-linter (through grimp) finds a package's modules by walking its folder, and ponder's package is assembled
from four top-level folders (pyproject's package-dir: ponder/, registry/, plugins/, serve/). So the check runs on
a copy laid out as Python sees the installed package: ponder/ with registry/, plugins/ and serve/ inside it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("registry", "plugins", "serve")  # ponder.<name> lives in the top-level folder <name>/
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _assembled(tmp_path: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    package = tmp_path / "ponder"
    shutil.copytree(ROOT / "ponder", package, ignore=ignore)
    for name in SUBPACKAGES:
        shutil.copytree(ROOT / name, package / name, ignore=ignore)
    return tmp_path


def _lint(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", str(ROOT / ".importlinter")], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)


def test_every_import_follows_the_rooms(tmp_path):
    result = _lint(_assembled(tmp_path))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in result.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("registry/manager.py", "from ponder.config import parse_config", "Rooms"),  # the registry sits below the core
    ("serve/engine.py", "import torch", "Serving imports nothing that imports torch"),
    ("ponder/model.py", "from ponder.plugins.halt.rules import ACT", "through the registry"),
    ("plugins/halt/rules.py", "from ponder.model import PonderLM", "Rooms"),  # plugins see only the contracts
])
def test_a_wrong_arrow_is_caught(tmp_path, module, line, contract):
    tree = _assembled(tmp_path)
    folder, _, name = module.partition("/")
    target = tree / "ponder" / name if folder == "ponder" else tree / "ponder" / folder / name
    target.write_text(target.read_text() + f"\n\ndef _wrong_arrow():\n    {line}\n")  # inside a function: still seen
    result = _lint(tree)
    assert result.returncode != 0
    assert contract in result.stdout and "BROKEN" in result.stdout


def test_every_package_folder_is_in_the_distribution():
    """A package folder that pyproject's list leaves out is there in a checkout and missing from a wheel."""
    from ponder.config import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    tree = _assembled_names()
    assert tree == listed, f"in the tree, not listed: {sorted(tree - listed)}; listed, not in the tree: " \
                           f"{sorted(listed - tree)}"


def _assembled_names() -> set[str]:
    names = set()
    for top, prefix in (("ponder", "ponder"), *((name, f"ponder.{name}") for name in SUBPACKAGES)):
        for init in (ROOT / top).rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                parts = init.parent.relative_to(ROOT / top).parts
                names.add(".".join((prefix, *parts)))
    presets = ROOT / "ponder" / "presets"
    if presets.is_dir():  # data-only package (its TOML files), no __init__.py needed
        names.add("ponder.presets")
    return names
