"""The ``ponder`` command line: parsing only; the work lives in importable functions.

Listing plugins and ``--help`` never import torch, so start-up stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from ponder import __version__

Handler = Callable[[argparse.Namespace], int]


def _plugin_switches(parser: argparse.ArgumentParser, dest: str) -> None:
    parser.add_argument(
        "-p", dest=dest, action="append", default=[], metavar="[no:]NAME",
        help="block a plugin by name (-p no:NAME, built-ins included) or load a third-party plugin "
             "even when autoload is off (-p NAME); repeatable",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ponder",
        description="Adaptive-depth transformers: train, export with in-graph early exit, serve.",
        epilog="Environment: PONDER_DISABLE_PLUGIN_AUTOLOAD=1 skips third-party plugins; "
               "PONDER_PLUGINS=a,b loads only those third-party plugins.",
    )
    parser.add_argument("--version", action="version", version=f"ponder {__version__}")
    _plugin_switches(parser, "plugin_switches")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    plugins = commands.add_parser("plugins", help="list and describe plugins",
                                  description="List and describe the registered plugins.")
    plugin_commands = plugins.add_subparsers(dest="plugins_command", metavar="SUBCOMMAND")

    ls = plugin_commands.add_parser("list", help="list registered plugins",
                                    description="List registered plugins: kind, name, provider, description.")
    ls.add_argument("--kind", help="only this kind: norm, optimizer, controller, halting")
    ls.add_argument("--pattern", help="only names matching this glob, e.g. '*norm'")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _plugin_switches(ls, "sub_plugin_switches")
    ls.set_defaults(handler=_plugins_list)

    show = plugin_commands.add_parser("show", help="show one plugin's parameters, defaults and docs",
                                      description="Show one plugin's parameters, defaults and documentation.")
    show.add_argument("kind", help="norm, optimizer, controller or halting")
    show.add_argument("name", help="the plugin's name (any spelling: DyT, dyt, dy_t)")
    show.add_argument("--json", action="store_true", help="print JSON instead of text")
    _plugin_switches(show, "sub_plugin_switches")
    show.set_defaults(handler=_plugins_show)
    plugins.set_defaults(handler=lambda args: _usage(plugins))
    return parser


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _configure_registry(switches: Sequence[str]) -> None:
    from ponder import registry

    block = [s[3:] for s in switches if s.startswith("no:")]
    load = [s for s in switches if not s.startswith("no:")]
    registry.configure(block=block, load=load)


def _load_registry() -> Any:
    """Load plugins, printing any load failure as a one-line warning on stderr."""
    from ponder import registry

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", registry.PluginLoadWarning)
        reg = registry.get_registry().load()
    for w in caught:
        print(f"ponder: warning: {w.message}", file=sys.stderr)
    return reg


def _plugins_list(args: argparse.Namespace) -> int:
    reg = _load_registry()
    infos = reg.list_plugins(args.kind, args.pattern)
    if args.json:
        failures = [{"plugin": f.plugin, "distribution": f.distribution, "version": f.version,
                     "error": f"{type(f.cause).__name__}: {f.cause}"} for f in reg.failures.values()]
        print(json.dumps({"plugins": [i.to_json() for i in infos], "failures": failures}, indent=2))
        return 0
    rows = [("KIND", "NAME", "PROVIDER", "PLUGIN", "DESCRIPTION")]
    rows += [(i.kind, i.name, f"{i.distribution} {i.version}", i.plugin, i.description) for i in infos]
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)) + "  " + row[4])
    if not infos:
        print("(no plugins match)")
    return 0


def _plugins_show(args: argparse.Namespace) -> int:
    reg = _load_registry()
    desc = reg.describe(args.kind, args.name)
    if args.json:
        print(json.dumps(desc.to_json(), indent=2))
        return 0
    info = desc.info
    print(f"{info.kind} {info.name}: {info.description}")
    print(f"  provided by {info.distribution} {info.version} (plugin {info.plugin!r})")
    print("parameters:")
    for p in desc.params:
        default = "required" if p.required else f"default {p.default!r}"
        role = ", supplied by ponder" if p.supplied_by_ponder else ""
        kind = f" ({p.annotation})" if p.annotation else ""
        print(f"  {p.name}{kind}: {default}{role}")
        if p.doc:
            print(f"      {p.doc}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        return _usage(parser)
    _configure_registry(args.plugin_switches + getattr(args, "sub_plugin_switches", []))
    from ponder.registry import PluginError

    try:
        return handler(args)
    except PluginError as exc:
        print(f"ponder: error: {exc}", file=sys.stderr)
        return 2
