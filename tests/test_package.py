"""The distribution: one `ponder` namespace in the wheel, importable from anywhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_wheel_installs_one_namespace_and_imports_from_anywhere(tmp_path):
    src = tmp_path / "src"  # build from a copy: no droppings in the checkout, no stale build/ in the wheel
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info",
                                                              "__pycache__", "runs", "models"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("ponder-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    (dist_info,) = tops - {"ponder"}  # nothing generic (registry, plugins, serve) at the top
    assert dist_info.startswith("ponder-") and dist_info.endswith(".dist-info")
    for expected in ("ponder/registry/hookspecs.py", "ponder/plugins/norm/basic.py", "ponder/serve/__init__.py",
                     "ponder/cli.py"):
        assert expected in names
    assert "ponder = ponder.cli:main" in zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))).decode()

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    # a bare interpreter that sees the wheel's files (and our dependencies), not the editable checkout
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    bare = tmp_path / "bare" / "bin" / "python"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])}
    out = subprocess.run(
        [str(bare), "-c", "import ponder.registry, ponder.plugins, ponder.serve, ponder;"
                          "print(ponder.__file__); print(len(ponder.registry.list_plugins()))"],
        check=True, capture_output=True, text=True, cwd=elsewhere, env=env).stdout.split()
    assert out[0].startswith(str(target))
    assert int(out[1]) >= 5


def test_editable_install_imports_from_any_directory(tmp_path):
    out = subprocess.run([sys.executable, "-c", "import ponder.registry, ponder.plugins, ponder.serve;"
                          "print(ponder.registry.__file__)"],
                         check=True, capture_output=True, text=True, cwd=tmp_path).stdout.strip()
    assert Path(out) == ROOT / "registry" / "__init__.py"
