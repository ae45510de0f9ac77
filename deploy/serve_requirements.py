"""Print what a ponder server needs from pip: the `serve` extra, and the core dependencies that serving imports.

pyproject.toml's core dependencies include torch, matplotlib and optuna, which training, export and tuning need
and a server never imports; `pip install '.[serve]'` would install them all (torch alone is hundreds of MB). The
container image installs this list instead, then ponder itself with `pip install --no-deps .`. The list is read
from pyproject.toml each time, so the image follows the serve extra as it changes.

    python deploy/serve_requirements.py [PYPROJECT] > requirements.txt

Standard library only on Python 3.11 and newer: the image runs it before anything is installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # the image runs 3.11; tomli is ponder's own dependency before that
    import tomli as tomllib

EXTRA = "serve"
# Core dependencies that serving never imports; tests/test_deploy.py checks that the server, its CLI and the
# modules it loads import none of them.
LEFT_OUT = frozenset({"torch", "matplotlib", "optuna", "safetensors", "tqdm"})

_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _name_and_extras(requirement: str) -> tuple[str, list[str]]:
    match = _NAME.match(requirement)
    if match is None:
        raise SystemExit(f"cannot read the requirement {requirement!r}")
    extras = [e.strip() for e in (match.group(2) or "").split(",") if e.strip()]
    return canonical(match.group(1)), extras


def requirements(pyproject: dict, extra: str = EXTRA) -> list[str]:
    """The requirement strings, as pyproject.toml spells them (versions and markers kept), in its order."""
    project = pyproject["project"]
    own = canonical(project["name"])
    extras = project.get("optional-dependencies", {})
    out = [r for r in project.get("dependencies", []) if _name_and_extras(r)[0] not in LEFT_OUT]
    done: set[str] = set()

    def add(name: str) -> None:  # an extra, with the extras of ponder it names (serve names ponder[onnx])
        if name in done:
            return
        if name not in extras:
            raise SystemExit(f"pyproject.toml has no extra {name!r}")
        done.add(name)
        for requirement in extras[name]:
            dist, inner = _name_and_extras(requirement)
            if dist == own:
                for e in inner:
                    add(e)
            elif requirement not in out:
                out.append(requirement)

    add(extra)
    return out


def main(argv: list[str]) -> int:
    path = Path(argv[1] if len(argv) > 1 else "pyproject.toml")
    with path.open("rb") as f:
        print("\n".join(requirements(tomllib.load(f))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
