"""``ponder demo`` (``make demo``): the main job end to end, on one machine, offline.

Train the demo model on the embedded corpus (or reuse / resume the run that is there), export it with early exit
into a model repository (or reuse the export of that very checkpoint), start ``ponder serve`` on 127.0.0.1, send the
validation text at each threshold through gRPC, print what each threshold costs and buys, draw it, stop the server.
Every step is the public code path a user would call by hand: ``Trainer``, ``export_checkpoint``, ``ponder serve``,
``ponder.serve.bench``.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ponder.errors import PonderError
from ponder.generation import SamplingParams, add_sampling_arguments, sampling_from_args
from ponder.limits import BENCH_THRESHOLDS
from ponder.model_repository import STAGING_PREFIX, check_model_name, is_version_folder, model_path, versions

if TYPE_CHECKING:
    import argparse

    import numpy as np

    from ponder.serve.bench import Remote

DEMO_COLUMNS = ("threshold", "layers_executed", "mean_token_depth", "p50_ms", "speedup", "ideal_speedup",
                "token_ideal_speedup", "perplexity")


@dataclass
class DemoOptions:
    run_dir: Path = Path("runs/demo")
    repository: Path = Path("models")
    name: str = "demo"
    preset: str = "demo"
    config: Path | None = None   # a run config instead of the preset
    steps: int | None = None     # override the config's train.steps
    fresh: bool = False          # forget the run and its exports first
    thresholds: Sequence[float] = field(default_factory=lambda: list(BENCH_THRESHOLDS))
    requests: int = 100          # timed requests per threshold (validation sequences, batch 1)
    warmup: int = 5
    prompt: str = "The return statement"
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=32))  # greedy
    progress: bool = True


def run_demo(o: DemoOptions, say: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole demo; returns its report (also written to RUN/demo.json, drawn in RUN/demo.png)."""
    from ponder.serve.bench import Settings, write_report

    Settings(thresholds=o.thresholds, batch_sizes=(1,), requests=o.requests, warmup=o.warmup).check()
    if o.steps is not None and o.steps < 1:
        raise PonderError(f"--steps must be >= 1, got {o.steps}")
    check_model_name(o.name, "--name")  # the name `ponder export` writes and `ponder serve` serves
    if not o.prompt:
        raise PonderError("--prompt is empty; give the text the generation starts from")
    o.sampling.check()
    from ponder.config import load_config

    run = load_config(o.config) if o.config else load_config(preset=o.preset)  # checked before anything is removed
    marks = [time.perf_counter()]
    if o.fresh:
        _forget(o, say)
    ckpt = _train(o, run, say)
    marks.append(time.perf_counter())
    version = _export(o, ckpt, say)
    marks.append(time.perf_counter())
    report = _serve_and_measure(o, ckpt, version, say)
    marks.append(time.perf_counter())
    timings = {f"{step}_s": b - a for step, a, b in zip(("train", "export", "serve"), marks, marks[1:], strict=False)}
    timings["total_s"] = marks[-1] - marks[0]
    report["timings"] = timings
    paths = write_report(report, o.run_dir, stem="demo",
                         title=f"ponder demo: {o.name}/{version} through ponder serve (gRPC), batch 1")
    _print_summary(report, say)
    say(f"wrote {paths[0]} and {paths[1]}; {timings['total_s']:.0f} s in all (train {timings['train_s']:.0f} s, "
        f"export {timings['export_s']:.0f} s, serve and measure {timings['serve_s']:.0f} s)")
    if report["server_exit_status"] != 0:  # the figures stand; the stop did not go cleanly
        raise PonderError(f"the server (pid {report['server_pid']}) exited with status {report['server_exit_status']}"
                          ", not 0")
    return report


# -- the steps --------------------------------------------------------------------------------------------------

def _forget(o: DemoOptions, say: Callable[[str], None]) -> None:
    """Remove the run folder and the model's exports, after checking they are what the demo wrote."""
    run, model = o.run_dir, o.repository / o.name
    if run.exists():
        if not ((run / "latest").is_file() or (run / "checkpoints").is_dir() or (run / "metrics.jsonl").is_file()):
            raise PonderError(f"--fresh would delete {str(run)!r}, which is not a ponder run folder; choose another "
                              "--run-dir")
        shutil.rmtree(run)
        say(f"--fresh: removed {run}")
    if model.exists():
        if not model.is_dir() or any(not (is_version_folder(c.name) or c.name.startswith(STAGING_PREFIX))
                                     for c in model.iterdir()):
            raise PonderError(f"--fresh would delete {str(model)!r}, which holds more than exported versions; "
                              "choose another --name")
        shutil.rmtree(model)
        say(f"--fresh: removed {model}")


def _train(o: DemoOptions, run: Any, say: Callable[[str], None]) -> Path:
    from ponder.checkpoint import read_config, read_trainer_state, resolve
    from ponder.config import parse_config
    from ponder.train import Trainer

    if (o.run_dir / "latest").is_file():
        ckpt = resolve(o.run_dir)
        saved = parse_config(read_config(ckpt)["run"])
        differ = sorted(k for k, v in run.to_json().items() if k != "train" and saved.to_json().get(k) != v)
        if differ:
            raise PonderError(f"{str(o.run_dir)!r} holds a run whose config differs from the one asked for (in "
                              f"{', '.join(differ)}); pass --fresh to retrain it, or --run-dir for another folder")
        step = int(read_trainer_state(ckpt)["step"])
        want = o.steps or saved.train.steps
        if step >= want:
            say(f"[1/4] reusing the model trained in {o.run_dir} (step {step}; `make demo FRESH=1` or --fresh "
                "retrains)")
            return ckpt
        say(f"[1/4] resuming {o.run_dir} from step {step} to {want}")
        trainer = Trainer(None, o.run_dir, resume=True, steps=o.steps, progress=o.progress)
    else:
        trainer = Trainer(run, o.run_dir, steps=o.steps, progress=o.progress)
        what = f"config {o.config}" if o.config else f"preset {o.preset!r}"
        say(f"[1/4] training the demo model ({what}: {trainer.model.num_parameters():,} parameters, "
            f"{trainer.run.train.steps} steps on {trainer.device}) into {o.run_dir}")
    final = trainer.train()
    say(f"      step {final['step']}: validation perplexity {final['perplexity']:.2f}, layers executed "
        f"{final['layers_executed']:.2f} of {final['n_layers']}, mean token depth {final['mean_token_depth']:.2f}")
    return resolve(o.run_dir)


def _export(o: DemoOptions, ckpt: Path, say: Callable[[str], None]) -> str:
    from ponder.export import export_checkpoint, weights_digest
    from ponder.serve.engine import read_metadata

    folder = o.repository / o.name
    if folder.is_dir():
        digest = weights_digest(ckpt)
        for v in reversed(versions(folder)):
            path = model_path(o.repository, o.name, v)
            meta = read_metadata(path)
            if (meta.get("source_weights_sha256") == digest and meta.get("compaction") == "auto"
                    and meta.get("decode_graph")):
                say(f"[2/4] reusing {path}, exported from these very weights")
                return str(v)
    say(f"[2/4] exporting {ckpt} to ONNX with early exit inside the graph, checked against PyTorch "
        "(about 20 s on 2 cores)")
    with _ticking("export", o.progress):
        report = export_checkpoint(ckpt, repository=o.repository, name=o.name)
    worst = max((c["max_logit_diff"] for c in report.checks), default=float("nan"))
    steps = sum(c.get("graph") == "decode" for c in report.checks)
    say(f"      wrote {report.path} in {report.seconds:.0f} s; ONNX Runtime matches PyTorch within {worst:.1e} "
        f"(logits) with the same layer counts at {len(report.checks) - steps} checked inputs and {steps} steps "
        "through the KV cache (decode.onnx)")
    return report.path.parent.name


def _serve_and_measure(o: DemoOptions, ckpt: Path, version: str, say: Callable[[str], None]) -> dict[str, Any]:
    from ponder.serve.bench import Remote, Settings, machine, measure, served

    rows, text = _validation_rows(ckpt)
    settings = Settings(thresholds=o.thresholds, batch_sizes=(1,), requests=o.requests, warmup=o.warmup)
    with served(o.repository, workers=1) as (address, proc):
        say(f"[3/4] started `ponder serve --repository {o.repository}` on {address} (pid {proc.pid})")
        say(f"[4/4] {o.requests} validation sequences of {rows.shape[1] - 1} tokens per threshold, batch 1, through "
            "gRPC, thresholds interleaved request by request")
        runner = Remote(address, o.name, version)
        try:
            results = measure(runner, runner.n_layers, rows, settings, o.progress)
            _sample(runner, o, 1.0)  # warm-up: the decode graph's first run allocates
            samples = [_sample(runner, o, t) for t in sorted({*o.thresholds, 1.0})]
        finally:
            runner.close()
    say(f"      stopped the server (pid {proc.pid}): exit status {proc.returncode}")
    return {"model": o.name, "version": version, "checkpoint": str(ckpt), "via": "grpc", "address": address,
            "server_pid": proc.pid, "server_exit_status": proc.returncode, "n_layers": runner.n_layers,
            "seq_len": rows.shape[1] - 1, "sequences": len(rows), "text": text, "concurrency": 1,
            "requests": o.requests, "warmup": o.warmup, "machine": machine(), "rows": results, "samples": samples,
            "sampling": _describe_sampling(o.sampling)}


def _validation_rows(ckpt: Path) -> tuple[np.ndarray, str]:
    """The run's own validation split as rows of seq_len + 1 token ids (what the model never trained on), and
    which text that is, in words."""
    from ponder.checkpoint import read_config
    from ponder.config import parse_config
    from ponder.data import prepare_data, tokenizer_from_json
    from ponder.serve.bench import EMBEDDED_TEXT, cut_rows

    saved = read_config(ckpt)
    run = parse_config(saved["run"])
    ids = prepare_data(run.data, tokenizer_from_json(saved["tokenizer"])).splits["valid"].numpy()
    rows = cut_rows(ids, min(run.train.seq_len, run.model.max_seq_len), "the validation split")
    text = EMBEDDED_TEXT if run.data.source == "embedded" else f"the validation split of {run.data.path}"
    return rows, text


def _sample(runner: Remote, o: DemoOptions, threshold: float) -> dict[str, Any]:
    """A short greedy generation through the server (byte-level models only), with layers per token."""
    from ponder.serve.client import ServerError

    try:
        reply = runner.client.generate_once(o.name, o.prompt, sampling=o.sampling,
                                            threshold=threshold, version=runner.version)
    except ServerError as exc:
        return {"threshold": threshold, "skipped": str(exc)}
    depths = [int(x) for x in reply.outputs["token_depth"]]
    return {"threshold": threshold, "prompt": o.prompt, "text": bytes(reply.outputs["text_output"][0]).decode(
            "utf-8", "replace"), "token_depth": depths, "round_trip_ms": reply.round_trip_ms,
            "first_token_ms": reply.params["first_token_ms"],
            "tokens_per_s": (len(depths) - 1) / max((reply.params["total_compute_ms"] - reply.params["first_token_ms"])
                                                    / 1e3, 1e-9)}


def _describe_sampling(p: SamplingParams) -> str:
    if p.greedy:
        return "greedy"
    parts = [f"temperature {p.temperature:g}"] + ([f"top_k {p.top_k}"] if p.top_k else []) + \
        ([f"top_p {p.top_p:g}"] if p.top_p < 1 else []) + ([f"seed {p.seed}"] if p.seed is not None else [])
    return "sampled (" + ", ".join(parts) + ")"


@contextlib.contextmanager
def _ticking(desc: str, enabled: bool) -> Iterator[None]:
    """An elapsed-time line for work that reports no progress of its own (the ONNX exporter)."""
    from tqdm import tqdm

    done = threading.Event()
    bar = tqdm(desc=desc, bar_format="{desc}: {elapsed}", disable=not enabled, file=sys.stderr, leave=False)

    def tick() -> None:
        while not done.wait(1.0):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        bar.close()


def _print_summary(report: dict[str, Any], say: Callable[[str], None]) -> None:
    from ponder.serve.bench import format_table, text_line

    rows = report["rows"]
    say("")
    say(f"{report['model']}/{report['version']} served over gRPC, batch 1, {report['requests']} requests per "
        f"threshold ({report['sequences']} validation sequences of {report['seq_len']} tokens):")
    say(format_table(rows, DEMO_COLUMNS))
    say("layers executed: what the request ran (its deepest token); mean token depth: layers per token; "
        "speed-up: p50 at threshold 1 over p50; ideal: n_layers / layers executed (the layer loop alone); "
        "per token: n_layers / mean token depth (the bound for compaction, which runs each layer on its running "
        "tokens)")
    say(text_line(report))
    low, full = rows[0], next(r for r in rows if r["threshold"] == 1.0)
    if low is not full:
        say(f"At threshold {low['threshold']:g} a request runs {low['layers_executed']:.2f} of {report['n_layers']} "
            f"layers (its tokens {low['mean_token_depth']:.2f} on average) and answers {low['speedup']:.2f}x as fast "
            f"as full depth, at perplexity {low['perplexity']:.3f} against {full['perplexity']:.3f}.")
    made = [s for s in report["samples"] if "text" in s]
    if made:
        say("")
        say(f"generation through the KV cache (decode.onnx), {report.get('sampling', 'greedy')}, "
            f"{len(made[0]['token_depth'])} tokens after {made[0]['prompt']!r}:")
        say(f"{'threshold':>9} {'depth':>6} {'first ms':>8} {'tokens/s':>9}  text")
        for s in made:
            depths = s["token_depth"]
            say(f"{s['threshold']:>9g} {sum(depths) / len(depths):>6.2f} {s['first_token_ms']:>8.2f} "
                f"{s['tokens_per_s']:>9.0f}  {s['text']!r}")
        say("depth: layers per generated token (mean); first ms: the prefill of the prompt; tokens/s: the tokens after "
            "it, through the cache (the server's compute)")
    for s in report["samples"]:
        if "skipped" in s:
            say(f"threshold {s['threshold']:g}: no generation: {s['skipped']}")


# -- the command line -------------------------------------------------------------------------------------------

def add_parser(commands: Any) -> None:
    """``ponder demo``'s parser (building it imports nothing heavy)."""
    de = commands.add_parser(
        "demo", help="the main job end to end: train, export, serve, measure per threshold",
        description="Train the demo model on the embedded corpus (a finished run is reused, an unfinished one "
                    "resumed), export it with early exit into a model repository (reused when those very weights "
                    "were exported before), start `ponder serve` on 127.0.0.1, send the validation text at each "
                    "threshold over gRPC, print a table (threshold, layers executed, mean token depth, p50 "
                    "latency, speed-up against full depth, perplexity), write RUN/demo.json and RUN/demo.png, and "
                    "stop the server. Offline; `make demo` runs it.")
    source = de.add_mutually_exclusive_group()
    source.add_argument("--preset", default="demo", help="a built-in config (default: demo)")
    source.add_argument("--config", type=Path, help="your own run config (TOML) instead of the preset")
    de.add_argument("--steps", type=int, help="train to this many steps (overrides train.steps)")
    de.add_argument("--fresh", action="store_true", help="forget the run and its exports, and start over")
    de.add_argument("--run-dir", type=Path, default=Path("runs/demo"), metavar="DIR",
                    help="the run folder (default: runs/demo)")
    de.add_argument("--repository", type=Path, default=Path("models"), metavar="ROOT",
                    help="the model repository (default: models)")
    de.add_argument("--name", default="demo", help="the model's name in the repository (default: demo)")
    de.add_argument("--thresholds", "-t", type=float, nargs="+", default=list(BENCH_THRESHOLDS), metavar="T",
                    help="act_threshold values in (0, 1] (default: %(default)s; 1.0 is always added)")
    de.add_argument("--requests", "-n", type=int, default=100, metavar="N",
                    help="timed requests per threshold (default: 100)")
    de.add_argument("--warmup", type=int, default=5, metavar="N", help="untimed requests per threshold (default: 5)")
    de.add_argument("--prompt", default="The return statement",
                    help="what the generation at each threshold starts from (default: %(default)r)")
    add_sampling_arguments(de)
    de.add_argument("--no-progress", action="store_true", help="no progress bars")
    de.set_defaults(handler=_command)


def _command(args: argparse.Namespace) -> int:
    options = DemoOptions(run_dir=args.run_dir, repository=args.repository, name=args.name, preset=args.preset,
                          config=args.config, steps=args.steps, fresh=args.fresh, thresholds=args.thresholds,
                          requests=args.requests, warmup=args.warmup, progress=not args.no_progress,
                          prompt=args.prompt, sampling=sampling_from_args(args))
    run_demo(options, say=lambda line: print(line, flush=True))
    return 0
