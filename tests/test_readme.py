"""The README's examples are the code that runs: the plugin example is the distribution the tests install, and
the flags it shows exist."""

from __future__ import annotations

import re
from pathlib import Path

from helpers import run_ponder

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def test_the_plugin_example_is_the_tested_distribution():
    blocks = dict(re.findall(r"```(?:python|toml)\n# (ponder-hello/[^\n]+)\n(.*?)```", README, re.S))
    assert sorted(blocks) == ["ponder-hello/ponder_hello.py", "ponder-hello/ponder_hello_layers.py",
                              "ponder-hello/pyproject.toml"]
    for name, body in blocks.items():
        assert body.strip() == (ROOT / "tests" / "plugin_dists" / name).read_text().strip(), name


def test_the_commands_the_readme_shows_accept_its_flags():
    for command in ("bench", "demo", "serve", "export", "train", "eval"):
        shown = set()
        for line in README.splitlines():
            if line.startswith(f"ponder {command} "):
                shown |= set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", line.split("#")[0]))
        help_text = run_ponder(command, "--help").stdout
        missing = sorted(flag for flag in shown if flag not in help_text)
        assert not missing, f"README shows ponder {command} {missing}, which --help does not list"


def test_the_docs_the_readme_links_exist():
    for target in re.findall(r"\]\(((?:docs|tests|examples)/[^)#]+)\)", README):
        assert (ROOT / target).exists(), target


def test_ci_runs_the_readmes_two_commands_in_the_readmes_order():
    """`make demo` then `make test` once failed (a compile step in the Makefile); CI now proves that order."""
    section = README.split("## Two commands", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    shown = [line.split("#")[0].strip() for line in section.strip().splitlines()]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip().startswith("make ")]
    assert shown == ["make demo", "make test"] and ci == shown
