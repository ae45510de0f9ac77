"""Every run config the README and docs/ show is copied as written into a file and trained with the real CLI.

Only what a reader must supply is supplied: the data file or folder the config names (made here, small) and
``--steps`` to keep it short. A config block holding alternatives ("# or ...") is split into each alternative."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import run_ponder

from ponder.config import tomllib  # the standard library's, or tomli before Python 3.11

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shown_configs() -> list[tuple[str, str]]:
    """(where, TOML text) for each run config in the README and docs; a plugin's pyproject (its [project] tables)
    is not one."""
    configs = []
    for page in PAGES:
        for number, block in enumerate(re.findall(r"```toml\n(.*?)```", page.read_text(), re.S), 1):
            if re.search(r"^\[project\b", block, re.M):
                continue
            alternatives = re.split(r"^# or\b.*\n", block, flags=re.M)
            for letter, text in zip("abcdefgh", alternatives, strict=False):
                where = f"{page.relative_to(ROOT)}#{number}" + (letter if len(alternatives) > 1 else "")
                configs.append((where, text))
    return configs


CONFIGS = shown_configs()


def test_the_docs_show_run_configs():
    pages = {where.split("#")[0] for where, _ in CONFIGS}
    assert {"README.md", "docs/training.md", "docs/controllers.md", "docs/optimizers.md"} <= pages
    assert any(where.startswith("docs/controllers.md#1b") for where, _ in CONFIGS)


def _provide_data(folder: Path, config: dict) -> None:
    """Make the data a config points at, the way a reader would: a text file, or a WikiText-2-shaped folder."""
    from ponder.data import embedded_corpus

    text = embedded_corpus()
    data = config.get("data", {})
    if data.get("source") == "text":
        path = folder / data["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text[:120_000])
    elif data.get("source") == "wikitext2":
        path = folder / data["path"]
        path.mkdir(parents=True, exist_ok=True)
        for split, part in (("train", text[:100_000]), ("valid", text[100_000:120_000]),
                            ("test", text[120_000:140_000])):
            (path / f"wiki.{split}.raw").write_text(part)


@pytest.mark.parametrize("where,text", CONFIGS, ids=[where for where, _ in CONFIGS])
def test_a_shown_config_trains(where, text, tmp_path):
    config = tomllib.loads(text)  # the block is valid TOML as shown
    _provide_data(tmp_path, config)
    (tmp_path / "run.toml").write_text(text)
    proc = run_ponder("train", "--config", str(tmp_path / "run.toml"), "--out", str(tmp_path / "run"),
                      "--steps", "3", "--no-progress", check=False, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, f"{where}: ponder train failed:\n{proc.stderr[-2000:]}"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("step") == 3 for r in records), f"{where}: no record of step 3"
