"""The ``ponder`` command line: parsing only; the work lives in importable functions.

Listing plugins and ``--help`` never import torch, so start-up stays fast.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ponder import __version__
from ponder.limits import (
    DEFAULT_OPSET,
    MAX_PERPLEXITY_RATIO,
    MIN_ARGMAX_AGREEMENT,
    PRECISIONS,
    THRESHOLD_RANGE,
)

Handler = Callable[[argparse.Namespace], int]


def _plugin_switches(parser: argparse.ArgumentParser, dest: str) -> None:
    parser.add_argument(
        "-p", dest=dest, action="append", default=[], metavar="[no:]NAME",
        help="block a plugin by name (-p no:NAME, built-ins included) or load a third-party plugin "
             "even when autoload is off (-p NAME); repeatable",
    )


def build_parser() -> argparse.ArgumentParser:
    from ponder.exported import add_parsers as add_exported_parsers
    from ponder.tokens import add_parser as add_tokenize_parser
    from ponder.tune.cli import add_parser as add_tune_parser

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

    tr = commands.add_parser("train", help="train an ACT language model",
                             description="Train an ACT language model from a TOML config or a built-in preset.")
    source = tr.add_mutually_exclusive_group()
    source.add_argument("--config", help="the run config (TOML)")
    source.add_argument("--preset", help="a built-in config, e.g. 'demo'")
    tr.add_argument("--out", "-o", default=None, help="run folder for checkpoints and metrics.jsonl "
                                                      "(default: runs/<preset or config name>)")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    tr.add_argument("--steps", type=int, help="train to this many steps (overrides train.steps)")
    tr.add_argument("--device", help="cpu, cuda, cuda:N or auto (overrides train.device)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.add_argument("--nproc", type=int, metavar="N",
                    help="train with N processes on this host (DistributedDataParallel, as torchrun would start "
                         "them: gloo on the CPU, nccl with one GPU per process); train.batch_size is the global "
                         "batch. For several hosts run `torchrun ... -m ponder train` (docs/training.md)")
    _plugin_switches(tr, "sub_plugin_switches")
    tr.set_defaults(handler=_train)

    add_tune_parser(commands)

    ev = commands.add_parser("eval", help="perplexity and depth of a checkpoint per threshold",
                             description="Evaluate a checkpoint: perplexity, layers executed and mean token depth "
                                         "per threshold, as a table, JSON and a PNG.")
    ev.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its latest checkpoint)")
    ev.add_argument("--threshold", "-t", type=float, nargs="+",
                    help=f"thresholds in {THRESHOLD_RANGE} (default: the trained one)")
    ev.add_argument("--split", choices=["valid", "test"], default="valid", help="which split (default: valid)")
    ev.add_argument("--batches", type=int, help="evaluate only the first N batches")
    ev.add_argument("--batch-size", type=int, help="sequences per batch (default: the training batch size); "
                                                   "layers executed is per batch, so 1 shows it per sequence")
    ev.add_argument("--output-dir", help="where eval.json and eval.png go (default: the run folder)")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _plugin_switches(ev, "sub_plugin_switches")
    ev.set_defaults(handler=_eval)

    an = commands.add_parser("analyze", help="analysis plots: norm S-curves, DyT alphas and dials over training",
                             description="Analysis plots of a checkpoint or a training run: what every norm layer "
                                         "does to its input (norms), each DyT/ADyT layer's alpha over the run "
                                         "(alphas), and the loss and every dial over the run (dials).")
    an_commands = an.add_subparsers(dest="analyze_command", metavar="SUBCOMMAND")
    norms = an_commands.add_parser("norms", help="input against output of every norm layer (S-curves)",
                                   description="Hook every norm layer of a checkpoint, run one validation batch, "
                                               "and plot output (affine removed) against input, with a fitted "
                                               "tanh per layer: norm_curves.png and norm_curves.json.")
    norms.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its latest checkpoint)")
    norms.add_argument("--output-dir", help="where the files go (default: the run folder)")
    norms.set_defaults(handler=_analyze_norms)
    alphas = an_commands.add_parser("alphas", help="DyT/ADyT alphas over a training run",
                                    description="Plot the alpha of every DyT/ADyT layer over a run, from its "
                                                "metrics.jsonl: alphas.png and alphas.json.")
    alphas.add_argument("run_dir", help="a training run folder")
    alphas.add_argument("--output-dir", help="where the files go (default: the run folder)")
    alphas.set_defaults(handler=_analyze_alphas)
    dials = an_commands.add_parser("dials", help="each dial and the loss over a training run",
                                   description="Plot the loss and every dial (RoPE base, attention window, ACT "
                                               "threshold) over a run, from its metrics.jsonl: dials.png and "
                                               "dials.json.")
    dials.add_argument("run_dir", help="a training run folder")
    dials.add_argument("--output-dir", help="where the files go (default: the run folder)")
    dials.set_defaults(handler=_analyze_dials)
    an.set_defaults(handler=lambda args: _usage(an))

    ex = commands.add_parser("export", help="export a checkpoint to ONNX with early exit inside the graph",
                             description="Export a checkpoint to ONNX: each layer runs only while a token is still "
                                         "running, and the threshold is an input set per call. The graph is checked "
                                         "against PyTorch before it is written.")
    ex.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its latest checkpoint)")
    where = ex.add_mutually_exclusive_group(required=True)
    where.add_argument("--repository", help="model repository root: writes ROOT/NAME/VERSION/model.onnx + config.json")
    where.add_argument("-o", "--output", help="a lone .onnx file instead of a repository")
    ex.add_argument("--name", help="model name in the repository")
    ex.add_argument("--version", type=int, help="version folder (default: one past the highest there)")
    ex.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default: %(default)s)")
    ex.add_argument("--no-fold", action="store_true", help="keep DyT/ADyT affines in the graph")
    ex.add_argument("--compaction", choices=["auto", "on", "off"], default="auto",
                    help="run each layer on its running tokens only: 'auto' (default) where that is faster, chosen "
                         "per layer in the graph; 'on' always; 'off' the dense layer loop")
    ex.add_argument("--no-decode", action="store_true",
                    help="write the scoring graph only, without decode.onnx (generation through a KV cache)")
    bound = f"within {MAX_PERPLEXITY_RATIO - 1:.0%} of fp32 and >= {MIN_ARGMAX_AGREEMENT:.0%} of tokens keep the argmax"
    ex.add_argument("--precision", choices=PRECISIONS, default="fp32",
                    help="weights of both graphs: fp32 (default, checked against PyTorch to 1e-4); int8 (per-channel "
                         "weights, activations quantized per call) or bf16 (half the file, float32 compute: ONNX "
                         "Runtime has no bf16 CPU kernels on x86), written only if validation perplexity stays "
                         + bound.replace("%", "%%"))
    ex.add_argument("--skip-check", action="store_true",
                    help="write without comparing ONNX Runtime against PyTorch (not recommended; the quality bound "
                         "of --precision bf16/int8 still applies)")
    ex.set_defaults(handler=_export)

    add_exported_parsers(commands)  # inspect, run
    add_tokenize_parser(commands)

    from ponder.demo import add_parser as add_demo_parser
    from ponder.serve.commands import add_parsers

    add_parsers(commands)  # serve, client, bench
    add_demo_parser(commands)
    return parser


def _export(args: argparse.Namespace) -> int:
    from ponder.export import check_opset, check_output, export_checkpoint
    from ponder.model_repository import check_model_name, check_version

    if args.repository and not args.name:
        raise _usage_error("--repository needs --name NAME")
    if args.output is not None and (args.name is not None or args.version is not None):
        raise _usage_error("--name and --version place a model in a --repository; with -o/--output the file "
                           "is named by the path")
    check_opset(args.opset)  # before the progress line: a mistake is the one line printed
    if args.name is not None:
        check_model_name(args.name)
    if args.version is not None:
        check_version(args.version)
    if args.output is not None:
        check_output(args.output)
    print(f"exporting {args.checkpoint} (checking against PyTorch: {not args.skip_check})...", file=sys.stderr)
    report = export_checkpoint(args.checkpoint, args.output, repository=args.repository, name=args.name,
                               version=args.version, opset=args.opset, check=not args.skip_check,
                               fold=not args.no_fold, compaction=args.compaction, decode=not args.no_decode,
                               precision=args.precision)
    scoring = [c for c in report.checks if c.get("graph") != "decode"]
    decoding = [c for c in report.checks if c.get("graph") == "decode"]
    if scoring:
        worst = max(c["max_logit_diff"] for c in scoring)
        layers = sorted({(c["threshold"], c["layers_executed"]) for c in scoring})
        print(f"checked {len(scoring)} runs against PyTorch: max logit difference {worst:.2e}, layers "
              f"executed per threshold {layers}")
    if decoding:
        worst = max(c["max_logit_diff"] for c in decoding)
        print(f"checked {len(decoding)} decode steps through the KV cache against PyTorch: max logit difference "
              f"{worst:.2e}")
    for row in report.quality:
        print(f"{report.precision} {row['graph']} graph at threshold {row['threshold']:g}: perplexity "
              f"{row['perplexity']:.4f} ({row['perplexity_ratio'] - 1:+.2%} against fp32), the same argmax on "
              f"{row['argmax_agreement']:.2%} of {row['tokens']} tokens")
    print(f"wrote {report.path} (opset {report.opset}, {report.precision}, {report.seconds:.1f} s)")
    return 0


def _analyze_norms(args: argparse.Namespace) -> int:
    from ponder.analyze import analyze_checkpoint_norms

    report, out = analyze_checkpoint_norms(args.checkpoint, args.output_dir)
    print(f"{'layer':<24} {'tanh alpha':>10} {'R2 tanh':>8} {'R2 line':>8}")
    for layer in report["layers"]:
        print(f"{layer['layer']:<24} {layer['alpha']:>10.3g} {layer['r2_tanh']:>8.3f} {layer['r2_linear']:>8.3f}")
    print(f"wrote {out / 'norm_curves.png'} and {out / 'norm_curves.json'}", file=sys.stderr)
    return 0


def _analyze_dials(args: argparse.Namespace) -> int:
    from ponder.analyze import analyze_dials

    report, out = analyze_dials(args.run_dir, args.output_dir)
    print(f"{'dial':<16} {'first':>10} {'last':>10} {'min':>10} {'max':>10}")
    for d in report["dials"]:
        print(f"{d['dial']:<16} {d['first']:>10.4g} {d['last']:>10.4g} {d['min']:>10.4g} {d['max']:>10.4g}")
    print(f"wrote {out / 'dials.png'} and {out / 'dials.json'}", file=sys.stderr)
    return 0


def _analyze_alphas(args: argparse.Namespace) -> int:
    from ponder.analyze import analyze_alphas

    report, out = analyze_alphas(args.run_dir, args.output_dir)
    print(f"{'layer':<24} {'first':>8} {'last':>8} {'min':>8} {'max':>8}")
    for layer in report["layers"]:
        print(f"{layer['layer']:<24} {layer['first']:>8.4f} {layer['last']:>8.4f} {layer['min']:>8.4f} "
              f"{layer['max']:>8.4f}")
    print(f"wrote {out / 'alphas.png'} and {out / 'alphas.json'}", file=sys.stderr)
    return 0


def _train(args: argparse.Namespace) -> int:
    import os

    from ponder import distributed
    from ponder.config import load_config
    from ponder.train import Trainer

    if args.steps is not None and args.steps < 1:
        raise _usage_error(f"--steps must be >= 1, got {args.steps}")
    if args.nproc is not None and args.nproc < 1:
        raise _usage_error(f"--nproc must be >= 1, got {args.nproc}")
    if args.out is None:
        if args.resume:
            raise _usage_error("--resume needs --out RUN_FOLDER")
        name = args.preset or (Path(args.config).stem if args.config else None)
        if name is None:
            raise _usage_error("give --config run.toml or --preset NAME")
        args.out = str(Path("runs") / name)
    run = None
    if args.config or args.preset or not args.resume:
        run = load_config(args.config, preset=args.preset)  # checked here, before any process is started
    if args.nproc is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        if not args.resume:
            from ponder.checkpoint import folder_problem

            problem = folder_problem(args.out)
            if problem:
                raise _usage_error(f"cannot write the run into {args.out!r}: {str(problem[0])!r} {problem[1]}; "
                                   "choose another --out")
        if run is not None:
            distributed.check_split(run.train.batch_size, args.nproc)
        return distributed.launch(args.nproc, _without_nproc(args.argv))
    try:
        trainer = Trainer(run, args.out, resume=args.resume, steps=args.steps, device=args.device,
                          progress=not args.no_progress)
        main = trainer.dist.is_main
        for note in trainer.notes if main else ():
            print(f"ponder: note: {note}", file=sys.stderr)
        if main:
            ranks = f" x {trainer.dist.world_size} processes" if trainer.dist.enabled else ""
            print(f"training {trainer.model.num_parameters():,} parameters on {trainer.device}{ranks} into "
                  f"{args.out} (from step {trainer.step} to {trainer.run.train.steps})", file=sys.stderr)
        final = trainer.train()
    finally:
        distributed.close()
    if not main:
        return 0
    print(f"step {final['step']}: valid loss {final['loss']:.4f}, perplexity {final['perplexity']:.2f}, "
          f"layers executed {final['layers_executed']:.2f} of {final['n_layers']}, "
          f"mean token depth {final['mean_token_depth']:.2f}")
    print(f"checkpoint: {args.out}/latest; metrics: {args.out}/metrics.jsonl")
    return 0


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """The command line again, for each process ``--nproc`` starts, less ``--nproc N``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _eval(args: argparse.Namespace) -> int:
    from ponder.checkpoint import resolve, run_folder
    from ponder.evaluate import evaluate_checkpoint
    from ponder.plots import plot_eval, run_label

    for flag in ("batches", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise _usage_error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    ckpt = resolve(args.checkpoint)
    results = evaluate_checkpoint(args.checkpoint, args.threshold, split=args.split, max_batches=args.batches,
                                  batch_size=args.batch_size)
    out_dir = Path(args.output_dir) if args.output_dir else run_folder(ckpt)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"checkpoint": str(ckpt), "split": args.split, "results": results}
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_eval(results, out_dir / "eval.png", title=f"{run_label(ckpt)} ({args.split})")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"batches of {results[0]['batch_size']} sequences; layers executed = the deepest token's depth per batch")
    print(f"{'threshold':>9}  {'perplexity':>10}  {'layers executed':>15}  {'mean token depth':>16}  of")
    for r in results:
        print(f"{r['threshold']:>9g}  {r['perplexity']:>10.3f}  {r['layers_executed']:>15.2f}  "
              f"{r['mean_token_depth']:>16.2f}  {r['n_layers']}")
    print(f"wrote {out_dir / 'eval.json'} and {out_dir / 'eval.png'}", file=sys.stderr)
    return 0


class _UsageError(Exception):
    pass


def _usage_error(message: str) -> _UsageError:
    return _UsageError(message)


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


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        return _usage(parser)
    switches = args.plugin_switches + getattr(args, "sub_plugin_switches", [])
    _configure_registry(switches)
    # SIGTERM unwinds like Ctrl-C does, so `finally` blocks run: a server `ponder demo` or `ponder bench` started
    # is stopped, temporary files are removed. (`ponder serve` installs its own handler, which drains.)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    from ponder.errors import PonderError
    from ponder.registry import PluginError

    try:
        if switches:  # now, so a -p naming no installed plugin is a one-line warning whatever the command
            _load_registry()
        return handler(args)
    except (PluginError, PonderError, _UsageError) as exc:
        print(f"ponder: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ponder: interrupted", file=sys.stderr)
        return 130
