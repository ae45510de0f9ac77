"""The ``ponder`` CLI in separate processes, with real plugin distributions on PYTHONPATH."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import listing, run_ponder

from ponder import __version__


def test_version():
    assert run_ponder("--version").stdout.strip() == f"ponder {__version__}"


@pytest.mark.parametrize("args", [(), ("plugins",), ("plugins", "list"), ("plugins", "show"), ("train",), ("eval",),
                                  ("analyze",), ("analyze", "norms"), ("analyze", "alphas"), ("analyze", "dials"),
                                  ("export",), ("inspect",), ("run",)])
def test_help_on_every_command(args):
    out = run_ponder(*args, "--help").stdout
    assert out.startswith("usage: ponder")


def test_listing_and_help_do_not_import_torch():
    code = ("import sys, contextlib, io\n"
            "from ponder.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    main(['plugins', 'list'])\n"
            "    main(['plugins', 'list', '--json'])\n"
            "    for args in (['--help'], ['train', '--help'], ['eval', '--help'], ['export', '--help']):\n"
            "        try: main(args)\n"
            "        except SystemExit: pass\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_list_table_and_json_agree():
    table = run_ponder("plugins", "list").stdout.splitlines()
    assert table[0].split() == ["KIND", "NAME", "PROVIDER", "PLUGIN", "DESCRIPTION"]
    data = listing()
    assert len(table) - 1 == len(data["plugins"])
    adamw = next(p for p in data["plugins"] if p["name"] == "adamw")
    assert adamw == {"kind": "optimizer", "name": "adamw", "description": "Adam with decoupled weight decay (torch)",
                     "plugin": "ponder.optim", "distribution": "ponder", "version": __version__}
    assert [p["name"] for p in listing("--kind", "norm")["plugins"]] == ["adyt", "dyt", "layernorm", "rmsnorm"]


def test_show_prints_parameters_with_defaults():
    out = run_ponder("plugins", "show", "optimizer", "AdamW").stdout
    assert "lr (float | torch.Tensor): default 0.001" in out
    assert "params" in out and "supplied by ponder" in out
    data = json.loads(run_ponder("plugins", "show", "norm", "RMS_Norm", "--json").stdout)
    assert {p["name"]: p.get("default") for p in data["params"]}["eps"] == 1e-6


def test_third_party_plugin_found_through_its_entry_point(plugin_dists):
    data = listing(paths=[plugin_dists["ponder-hello"]])
    hello = [p for p in data["plugins"] if p["distribution"] == "ponder-hello"]
    assert hello == [{"kind": "norm", "name": "ScaleNorm", "description": "g * x / ||x|| with one learned scale",
                      "plugin": "hello", "distribution": "ponder-hello", "version": "0.3.1"}]
    assert data["failures"] == []
    show = run_ponder("plugins", "show", "norm", "scalenorm", paths=[plugin_dists["ponder-hello"]]).stdout
    assert "eps: default 1e-05" in show and "floor on the norm" in show


def test_broken_plugin_is_reported_and_listing_still_works(plugin_dists):
    paths = [plugin_dists["ponder-hello"], plugin_dists["ponder-broken"]]
    proc = run_ponder("plugins", "list", "--json", paths=paths)
    data = json.loads(proc.stdout)
    assert {p["name"] for p in data["plugins"]} >= {"layernorm", "adamw", "ScaleNorm"}
    failures = {f["plugin"]: f for f in data["failures"]}
    assert failures["badimport"]["distribution"] == "ponder-broken"
    assert "ponder_missing_dependency_xyz" in failures["badimport"]["error"]
    assert failures["badhook"]["error"] == "RuntimeError: halfnorm's config file is missing"
    assert "warning: plugin 'badimport' from ponder-broken 0.0.1 failed to load" in proc.stderr
    asked = run_ponder("plugins", "show", "norm", "badimport", paths=paths, check=False)
    assert asked.returncode == 2
    assert "ponder: error: plugin 'badimport' from ponder-broken 0.0.1 failed to load" in asked.stderr
    assert "Traceback" not in asked.stderr


def test_switches(plugin_dists):
    paths = [plugin_dists["ponder-hello"], plugin_dists["ponder-broken"]]

    def names(*args, env=None):
        return {p["name"] for p in listing(*args, paths=paths, env=env)["plugins"]}

    assert "ScaleNorm" not in names(env={"PONDER_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert "ScaleNorm" in names("-p", "hello", env={"PONDER_DISABLE_PLUGIN_AUTOLOAD": "1"})
    only = listing(paths=paths, env={"PONDER_PLUGINS": "ponder-hello"})
    assert "ScaleNorm" in {p["name"] for p in only["plugins"]} and only["failures"] == []
    assert "ScaleNorm" not in names("-p", "no:hello")
    blocked = names("-p", "no:ponder.norm")
    assert "layernorm" not in blocked and "adamw" in blocked
    # the switch works after the subcommand too, and both places add up
    proc = run_ponder("-p", "no:ponder.norm", "-p", "no:ponder.halt", "-p", "no:ponder.control", "plugins", "list",
                      "--json", "-p", "no:ponder.optim", paths=paths)
    assert {p["name"] for p in json.loads(proc.stdout)["plugins"]} == {"ScaleNorm"}


def test_errors_are_one_line_without_traceback():
    proc = run_ponder("plugins", "show", "norm", "layrnorm", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("ponder: error: unknown norm 'layrnorm'; did you mean 'layernorm'? "
                                   "Known norm plugins: adyt, dyt, layernorm, rmsnorm")
    proc = run_ponder("plugins", "list", "--kind", "gizmo", check=False)
    assert proc.returncode == 2 and "unknown plugin kind 'gizmo'" in proc.stderr


def test_conflict_is_an_error_naming_both_distributions(plugin_dists):
    proc = run_ponder("plugins", "show", "norm", "layernorm", paths=[plugin_dists["ponder-clash"]], check=False)
    assert proc.returncode == 2
    assert "ponder 0.1.0 (plugin 'ponder.norm') and ponder-clash 2.0.0 (plugin 'clash')" in proc.stderr
