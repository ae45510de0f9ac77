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

    _tune_parser(commands)

    ev = commands.add_parser("eval", help="perplexity and depth of a checkpoint per threshold",
                             description="Evaluate a checkpoint: perplexity, layers executed and mean token depth "
                                         "per threshold, as a table, JSON and a PNG.")
    ev.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its latest checkpoint)")
    ev.add_argument("--threshold", "-t", type=float, nargs="+", help="thresholds in (0, 1] (default: the trained one)")
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
    ex.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    ex.add_argument("--no-fold", action="store_true", help="keep DyT/ADyT affines in the graph")
    ex.add_argument("--compaction", choices=["auto", "on", "off"], default="auto",
                    help="run each layer on its running tokens only: 'auto' (default) where that is faster, chosen "
                         "per layer in the graph; 'on' always; 'off' the dense layer loop")
    ex.add_argument("--skip-check", action="store_true",
                    help="write without comparing ONNX Runtime against PyTorch (not recommended)")
    ex.set_defaults(handler=_export)

    ins = commands.add_parser("inspect", help="print an exported model's metadata, inputs and outputs",
                              description="Print the ponder metadata, inputs and outputs of an exported model.")
    ins.add_argument("model", help="a model.onnx written by ponder export, a version folder (its model.onnx), a "
                                   "model folder (its newest version) or a repository holding one model")
    ins.add_argument("--json", action="store_true", help="print JSON")
    ins.set_defaults(handler=_inspect)

    rn = commands.add_parser("run", help="run an exported model on text with ONNX Runtime",
                             description="Run an exported model in-process with ONNX Runtime: greedy next tokens "
                                         "after --text, with the layers executed and the latency of each step.")
    rn.add_argument("model", help="a model.onnx written by ponder export, or a version or model folder")
    rn.add_argument("--text", required=True, help="the prompt")
    rn.add_argument("--threshold", "-t", type=float, help="act_threshold in (0, 1] (default: the trained one)")
    rn.add_argument("--tokens", type=int, default=32, help="how many tokens to generate (default: 32)")
    rn.set_defaults(handler=_run)

    tk = commands.add_parser("tokenize", help="turn text into a model's token ids, or ids back into text",
                             description="Turn text into the token ids a model reads, with the tokenizer it was "
                                         "trained with (bytes, or the word vocabulary its run built), or with "
                                         "--decode ids back into text. The ids go to `ponder client infer --ids`. "
                                         "A word-level model reads whitespace-separated words, ends every line "
                                         "with <eos> and reads unknown words as <unk>.")
    tk.add_argument("model", metavar="MODEL_OR_RUN",
                    help="an exported model (a model.onnx, a version or model folder), or a checkpoint or run folder")
    what = tk.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="the text to turn into ids")
    what.add_argument("--decode", metavar="IDS", help="token ids separated by spaces or commas, to turn into text")
    tk.add_argument("--json", action="store_true",
                    help="print JSON: the tokenizer, the vocabulary size and the ids (or the text)")
    tk.set_defaults(handler=_tokenize)

    from ponder.demo import add_parser as add_demo_parser
    from ponder.serve.commands import add_parsers

    add_parsers(commands)  # serve, client, bench
    add_demo_parser(commands)
    return parser


def _export(args: argparse.Namespace) -> int:
    from ponder.export import check_opset, check_output, export_checkpoint

    if args.repository and not args.name:
        raise _usage_error("--repository needs --name NAME")
    check_opset(args.opset)  # before the progress line: a mistake is the one line printed
    if args.output is not None:
        check_output(args.output)
    print(f"exporting {args.checkpoint} (checking against PyTorch: {not args.skip_check})...", file=sys.stderr)
    report = export_checkpoint(args.checkpoint, args.output, repository=args.repository, name=args.name,
                               version=args.version, opset=args.opset, check=not args.skip_check,
                               fold=not args.no_fold, compaction=args.compaction)
    if report.checks:
        worst = max(c["max_logit_diff"] for c in report.checks)
        layers = sorted({(c["threshold"], c["layers_executed"]) for c in report.checks})
        print(f"checked {len(report.checks)} runs against PyTorch: max logit difference {worst:.2e}, layers "
              f"executed per threshold {layers}")
    print(f"wrote {report.path} (opset {report.opset}, {report.seconds:.1f} s)")
    return 0


def _model_file(arg: str) -> Path:
    """The model.onnx that a file, version folder, model folder (its newest version) or one-model repository names,
    as `ponder bench` finds it."""
    from ponder.serve.bench import resolve_target

    target = resolve_target(arg)
    return Path(arg) if target.path is None else target.path  # a path that does not exist: reported by the caller


def _inspect(args: argparse.Namespace) -> int:
    from ponder.serve.engine import read_metadata

    meta = read_metadata(_model_file(args.model))
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    for key, value in meta.items():
        if key in ("inputs", "outputs"):
            continue
        print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    for key in ("inputs", "outputs"):
        print(f"{key}:")
        for name, shape in meta[key]:
            print(f"  {name}: {shape}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from ponder.serve.engine import Engine

    if args.tokens < 1:
        raise _usage_error(f"--tokens must be >= 1, got {args.tokens}")
    engine = Engine(_model_file(args.model))
    threshold = engine.check_threshold(args.threshold)
    out = engine.generate(args.text, args.tokens, threshold)
    steps = out["steps"]
    layers = [s["layers_executed"] for s in steps]
    ms = sorted(s["compute_ms"] for s in steps)
    print(f"{args.text}\u2192{out['text']}")
    print(f"threshold {threshold:g}: layers executed per token {layers} (mean {sum(layers) / len(layers):.2f} of "
          f"{engine.n_layers}); latency p50 {ms[len(ms) // 2]:.2f} ms, total {sum(ms):.1f} ms")
    return 0


def _tokenizer_spec(arg: str) -> tuple[dict[str, Any], str]:
    """``(tokenizer description, where it was found)`` of a checkpoint or run folder or an exported model: the
    checkpoint's config.json, or the config.json beside model.onnx, or the model's own metadata."""
    from ponder.checkpoint import CONFIG, read_config, resolve
    from ponder.errors import PonderError

    path = Path(arg)
    if path.is_dir() and ((path / "latest").is_file()
                          or ((path / CONFIG).is_file() and not (path / "model.onnx").is_file())):
        ckpt = resolve(path)
        return read_config(ckpt).get("tokenizer") or {"kind": "byte"}, str(ckpt / CONFIG)
    model = _model_file(arg)
    if not model.exists():
        raise PonderError(f"{arg!r} does not exist: give an exported model (a model.onnx, a version or model folder) "
                          "or a checkpoint or run folder")
    for candidate in (model.parent / "config.json", model.with_suffix(".json")):  # as ponder serve reads them
        if candidate.is_file():
            try:
                spec = json.loads(candidate.read_text(encoding="utf-8")).get("tokenizer")
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
                raise PonderError(f"{str(candidate)!r} is unreadable: {exc}") from None
            if spec:
                return spec, str(candidate)
    from ponder.serve.engine import read_metadata

    spec = read_metadata(model).get("tokenizer") or {"kind": "byte"}
    if spec.get("kind") != "byte" and "vocab" not in spec:
        raise PonderError(f"{str(model)!r} is a {spec.get('kind')}-level model, but no config.json with its vocabulary "
                          "lies beside it (ponder export writes one)")
    return spec, str(model)


def _tokenize(args: argparse.Namespace) -> int:
    from ponder.data import tokenizer_from_json

    spec, source = _tokenizer_spec(args.model)
    tokenizer = tokenizer_from_json(spec)
    size = tokenizer.vocab_size
    if args.decode is not None:
        try:
            ids = [int(x) for x in args.decode.replace(",", " ").split()]
        except ValueError:
            raise _usage_error(f"--decode takes whole numbers separated by spaces or commas, got {args.decode!r}"
                               ) from None
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            raise _usage_error(f"--decode: {bad[0]} is not a token id of this model (its ids are 0..{size - 1})")
        text = tokenizer.decode(ids)
        print(json.dumps({"tokenizer": tokenizer.kind, "vocab_size": size, "ids": ids, "text": text}, indent=2)
              if args.json else text)
        return 0
    ids = [int(i) for i in tokenizer.encode(args.text)]
    unknown = ids.count(0) if tokenizer.kind == "word" else 0
    if args.json:
        print(json.dumps({"tokenizer": tokenizer.kind, "vocab_size": size, "source": source, "ids": ids,
                          "unknown": unknown}, indent=2))
    else:
        print(" ".join(map(str, ids)))
    if unknown:
        print(f"ponder: note: {unknown} of {len(ids)} tokens are <unk> (id 0): words outside the model's vocabulary",
              file=sys.stderr)
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


def _tune_parser(commands: Any) -> None:
    tu = commands.add_parser("tune", help="tune ACT's threshold and lambda (Optuna grid or Pareto search)",
                             description="Grid search over act_threshold x act_lambda on Optuna, training a small "
                                         "PonderLM (shaped by --d-model, --n-layers, --seq-len) on --data. "
                                         "--mode sweep trains one model per lambda and evaluates every threshold "
                                         "on it; --mode full trains every cell. Several workers (processes or "
                                         "hosts) may share one --storage: each cell is computed by one of them, "
                                         "and each prints the whole table at the end.")
    tu.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.95, 0.99], metavar="T",
                    help="act_threshold values in (0, 1] to evaluate (default: 0.5 0.8 0.9 0.95 0.99)")
    tu.add_argument("--lambdas", type=float, nargs="+", default=[0.001, 0.005, 0.01, 0.05, 0.1], metavar="L",
                    help="act_lambda values >= 0, the ponder cost: higher trains shallower models "
                         "(default: 0.001 0.005 0.01 0.05 0.1)")
    tu.add_argument("--epochs", type=int, default=3, metavar="N",
                    help="passes over the training data per model (default: %(default)s)")
    tu.add_argument("--steps", type=int, metavar="N",
                    help="cap the optimizer steps of each training (default: no cap, --epochs decides)")
    tu.add_argument("--batch-size", type=int, default=32, metavar="N",
                    help="sequences per batch, in training and validation (default: %(default)s)")
    tu.add_argument("--score-metric", default="balanced", metavar="METRIC",
                    help="what picks the best configuration, lower is better: perplexity, layers, or balanced "
                         "(perplexity + 10 x layers executed) (default: %(default)s)")
    tu.add_argument("--data", metavar="PATH",
                    help="a WikiText-2 folder (word-level) or a UTF-8 text file (byte-level, split 90/5/5) "
                         "(default: the embedded corpus, byte-level)")
    tu.add_argument("--output-dir", default="results/act_tuning", metavar="DIR",
                    help="where act_tuning_results.json and the plots go (default: %(default)s)")
    tu.add_argument("--mode", default="sweep", help="sweep (one training per lambda, evaluated at every threshold) "
                                                    "or full (one training per cell) (default: %(default)s)")
    tu.add_argument("--search", default="grid", help="grid, or pareto (NSGA-II over [min, max] of the "
                                                    "thresholds and lambdas, objectives perplexity and layers) "
                                                    "(default: %(default)s)")
    tu.add_argument("--train-threshold", type=float, metavar="T",
                    help="sweep mode: the threshold each lambda's model trains at (default: the highest of "
                         "--thresholds)")
    tu.add_argument("--trials", type=int, default=20, metavar="N",
                    help="trials of --search pareto, all workers together (default: %(default)s)")
    tu.add_argument("--seeds", type=int, default=1, metavar="N",
                    help="repeat each configuration with random seeds 0..N-1 and report mean and spread "
                         "(default: %(default)s)")
    tu.add_argument("--storage", help="Optuna storage to resume from, e.g. sqlite:///tune.db or "
                                      "postgresql://user:password@host/db; several workers may share one "
                                      "(default: none, in memory)")
    tu.add_argument("--study-name", help="study name in --storage (default: ponder-act-grid or ponder-act-pareto)")
    tu.add_argument("--heartbeat", type=int, default=30, metavar="SECONDS",
                    help="with --storage: a worker beats every SECONDS for the cells it computes; a cell whose "
                         "worker is silent for 4 beats is redone by another worker (default: %(default)s)")
    tu.add_argument("--seq-len", type=int, default=128, metavar="N",
                    help="tokens per sequence, also the model's context (default: %(default)s)")
    tu.add_argument("--d-model", type=int, default=64, metavar="N",
                    help="the model's width; heads: d_model / 32 (at least 1), d_ff: 4 x d_model "
                         "(default: %(default)s)")
    tu.add_argument("--n-layers", type=int, default=4, metavar="N",
                    help="the model's layers, the most a token can run (default: %(default)s)")
    tu.add_argument("--eval-batches", type=int, metavar="N",
                    help="cap the validation batches per evaluation (default: the whole validation split)")
    tu.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    tu.add_argument("--no-progress", action="store_true", help="no progress bar (default: a progress bar)")
    tu.set_defaults(handler=_tune)


def _tune(args: argparse.Namespace) -> int:
    from ponder.errors import ConfigError

    for flag, choices in (("score_metric", ("perplexity", "layers", "balanced")), ("mode", ("sweep", "full")),
                          ("search", ("grid", "pareto"))):
        if getattr(args, flag) not in choices:
            raise ConfigError(f"unknown --{flag.replace('_', '-')} {getattr(args, flag)!r}; "
                              f"choose from {', '.join(choices)}")
    for t in args.thresholds + ([args.train_threshold] if args.train_threshold is not None else []):
        if not 0.0 < t <= 1.0:
            raise ConfigError(f"--thresholds: {t} is outside (0, 1]")
    for lam in args.lambdas:
        if not lam >= 0.0:
            raise ConfigError(f"--lambdas: {lam} is negative")
    for flag in ("epochs", "steps", "batch_size", "trials", "seeds", "seq_len", "d_model", "n_layers",
                 "eval_batches", "heartbeat"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    from ponder.tune import format_table, run_act_hyperparameter_tuning

    r = run_act_hyperparameter_tuning(
        args.data, args.batch_size, args.epochs, args.output_dir, threshold_values=args.thresholds,
        lambda_values=args.lambdas, score_metric=args.score_metric, mode=args.mode, search=args.search,
        n_trials=args.trials, seeds=args.seeds, storage=args.storage, study_name=args.study_name,
        d_model=args.d_model, n_layers=args.n_layers, n_seq=args.seq_len, max_steps=args.steps,
        max_eval_batches=args.eval_batches, device=args.device, progress=not args.no_progress,
        train_threshold=args.train_threshold, heartbeat_interval=args.heartbeat)
    print(format_table(r))
    print(f"best: threshold {r['best_config']['threshold']:g}, lambda {r['best_config']['lambda']:g} "
          f"({r['score_metric']} score {r['best_score']:.3f}); {r['n_trainings']} trainings, "
          f"{r['resumed_trials']} trials resumed, {r['cells_computed_here']} computed here")
    print(f"wrote {args.output_dir}/act_tuning_results.json and plots", file=sys.stderr)
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
