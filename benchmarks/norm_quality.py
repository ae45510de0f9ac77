"""What each norm trains to: LayerNorm, RMSNorm, DyT and ADyT in the demo preset, several seeds, one run.

    python benchmarks/norm_quality.py [--steps 600] [--seeds 0 1 2] [--norms layernorm rmsnorm dyt adyt]
                                      [--workers 2] [--out benchmarks/results/norm_quality.json]
                                      [--set KEY=VALUE ...] [--embed-scale VALUE|off]

Each (norm, seed) trains the demo preset (``ponder/presets/demo.toml``) with only ``[norm] name`` and
``train.seed`` changed, every norm with its defaults (DyT and ADyT: the language-model recipe of docs/norms.md:
scaled embeddings, alpha chosen by width). Trainings run ``--workers`` at a time, one thread each, so every norm
shares the machine alike. ``--set norm.alpha_init_value=2.0`` (a TOML value; dotted keys into the run config, e.g.
``norm.positions.final.alpha_init_value``) and ``--embed-scale`` (a fixed starting value, or ``off``: no scale)
change the recipe, which is how each row of docs/norms.md is reproduced. From each run's metrics: the validation
loss every ``--eval-every`` steps, and at the end
the validation perplexity and mean token depth at the trained threshold.

Writes the JSON (per run and per norm: mean over seeds, ratio to LayerNorm, the goals of issue 23 checked) and a
plot of validation loss against step (``.png`` beside the JSON): the mean over seeds, the band from the best to
the worst seed.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from ponder import __version__

NORMS = ["layernorm", "rmsnorm", "dyt", "adyt"]
GOAL_PERPLEXITY_RATIO = 1.05  # DyT and ADyT within 5% of LayerNorm's validation perplexity (mean of the seeds)
GOAL_DEPTH_GAP = 1.0  # and their mean token depth within one layer of LayerNorm's


def run_config(norm: str, seed: int, steps: int, eval_every: int, overrides: dict[str, Any]) -> Any:
    """The demo preset with ``norm``, ``seed``, ``steps`` and the dotted ``overrides`` applied."""
    from importlib import resources

    import tomllib

    from ponder.config import parse_config

    raw = tomllib.loads(resources.files("ponder.presets").joinpath("demo.toml").read_text())
    raw["norm"] = {"name": norm}
    raw["train"].update(seed=seed, steps=steps, eval_every=eval_every, checkpoint_every=steps)
    for key, value in overrides.items():
        *path, last = key.split(".")
        table = raw
        for part in path:
            table = table.setdefault(part, {})
        table[last] = value
    return parse_config(raw)


def train_one(norm: str, seed: int, steps: int, eval_every: int, threads: int, overrides: dict[str, Any],
              embed_scale: float | str | None) -> dict:
    """Train the demo preset with ``norm`` and ``seed``; the validation curve and the final figures."""
    import torch

    from ponder.train import Trainer

    torch.set_num_threads(threads)
    run = run_config(norm, seed, steps, eval_every, overrides)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(run, Path(tmp) / "run", progress=False)
        if embed_scale is not None and trainer.model.embed.scale is not None:
            with torch.no_grad():
                trainer.model.embed.scale.fill_(1.0 if embed_scale == "off" else float(embed_scale))
            trainer.model.embed.scale.requires_grad_(embed_scale != "off")  # off: x * 1, never trained
        final = trainer.train()
        records = [json.loads(line) for line in trainer.metrics_path.read_text().splitlines()]
    valid = [r for r in records if r["split"] == "valid"]
    return {"norm": norm, "seed": seed, "steps": steps, "overrides": overrides, "embed_scale": embed_scale,
            "seconds": round(time.perf_counter() - started, 1),
            "perplexity": final["perplexity"], "loss": final["loss"], "mean_token_depth": final["mean_token_depth"],
            "layers_executed": final["layers_executed"], "threshold": final["threshold"],
            "curve": [{"step": r["step"], "loss": r["loss"]} for r in valid],
            "train_loss_max_after_warmup": max((r["loss"] for r in records
                                                if r["split"] == "train" and r["step"] > run.train.warmup_steps),
                                               default=math.nan)}


def summarise(runs: list[dict], norms: list[str]) -> dict:
    by_norm = {n: [r for r in runs if r["norm"] == n] for n in norms}
    out: dict[str, dict] = {}
    for norm, rs in by_norm.items():
        if not rs:
            continue
        out[norm] = {"seeds": [r["seed"] for r in rs],
                     "perplexity_mean": statistics.fmean(r["perplexity"] for r in rs),
                     "perplexity_per_seed": [round(r["perplexity"], 3) for r in rs],
                     "mean_token_depth": statistics.fmean(r["mean_token_depth"] for r in rs),
                     "seconds_mean": statistics.fmean(r["seconds"] for r in rs)}
    base = out.get("layernorm")
    if base:
        for norm, s in out.items():
            s["perplexity_ratio_to_layernorm"] = s["perplexity_mean"] / base["perplexity_mean"]
            s["depth_gap_to_layernorm"] = s["mean_token_depth"] - base["mean_token_depth"]
            if norm in ("dyt", "adyt"):
                s["goal_perplexity_met"] = s["perplexity_ratio_to_layernorm"] <= GOAL_PERPLEXITY_RATIO
                s["goal_depth_met"] = abs(s["depth_gap_to_layernorm"]) <= GOAL_DEPTH_GAP
    return out


def plot(runs: list[dict], norms: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for norm in norms:
        rs = [r for r in runs if r["norm"] == norm]
        if not rs:
            continue
        steps = [p["step"] for p in rs[0]["curve"]]
        per_step = [[r["curve"][i]["loss"] for r in rs] for i in range(len(steps))]
        mean = [statistics.fmean(v) for v in per_step]
        line, = ax.plot(steps, mean, marker="o", markersize=3, label=f"{norm} (final ppl "
                        f"{statistics.fmean(r['perplexity'] for r in rs):.2f})")
        ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], color=line.get_color(),
                        alpha=0.15, linewidth=0)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (nats per byte)")
    seeds = sorted({r["seed"] for r in runs})
    ax.set_title(f"demo preset, norm swapped; mean of seeds {seeds} (band: best to worst seed)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_settings(parser: argparse.ArgumentParser, items: list[str], norms: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` settings, each VALUE a TOML value (a bare word is taken as a string); checked by building the
    run config of each norm."""
    import tomllib

    from ponder.errors import PonderError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--set takes KEY=VALUE, got {item!r}")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value
    for norm in norms:
        try:
            run_config(norm, 0, 1, 1, out)
        except PonderError as exc:
            parser.error(f"--set: {exc}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="training steps per run (default: 600)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--norms", nargs="+", default=NORMS, help=f"norm plugins (default: {' '.join(NORMS)})")
    parser.add_argument("--eval-every", type=int, default=50, help="validation every this many steps (default: 50)")
    parser.add_argument("--workers", type=int, default=2, help="trainings at a time, one thread each (default: 2)")
    parser.add_argument("--out", default="benchmarks/results/norm_quality.json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a run-config setting as a TOML value, e.g. norm.alpha_init_value=2.0 (repeatable)")
    parser.add_argument("--embed-scale", default=None, metavar="VALUE|off",
                        help="start the embedding scale (DyT, ADyT) at VALUE instead of sqrt(d_model), or 'off'")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.eval_every < 1 or args.workers < 1:
        parser.error("--steps, --eval-every and --workers must be >= 1")
    embed_scale = args.embed_scale
    if embed_scale not in (None, "off"):
        try:
            embed_scale = float(embed_scale)
        except ValueError:
            parser.error(f"--embed-scale must be a number or 'off', got {embed_scale!r}")
    from ponder import registry

    installed = sorted(info.name for info in registry.list_plugins("norm"))
    unknown = [n for n in args.norms if n not in installed]
    if unknown:
        parser.error(f"unknown norm(s) {unknown}; installed: {', '.join(installed)}")
    overrides = parse_settings(parser, args.set, args.norms)

    jobs = [(n, s) for s in args.seeds for n in args.norms]
    runs: list[dict] = []
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=context) as pool:
        futures = [pool.submit(train_one, n, s, args.steps, args.eval_every, 1, overrides, embed_scale)
                   for n, s in jobs]
        for done, future in enumerate(as_completed(futures), 1):
            r = future.result()
            runs.append(r)
            print(f"[{done}/{len(jobs)}] {r['norm']:<9} seed {r['seed']}: perplexity {r['perplexity']:.3f}, "
                  f"mean token depth {r['mean_token_depth']:.2f} ({r['seconds']:.0f} s)", file=sys.stderr, flush=True)
    runs.sort(key=lambda r: (args.norms.index(r["norm"]), r["seed"]))
    summary = summarise(runs, args.norms)
    report = {"benchmark": "norm_quality", "ponder": __version__, "python": platform.python_version(),
              "machine": platform.machine(), "steps": args.steps, "seeds": args.seeds, "overrides": overrides,
              "embed_scale": embed_scale,
              "wall_seconds": round(time.perf_counter() - started, 1),
              "goals": {"perplexity_ratio_max": GOAL_PERPLEXITY_RATIO, "depth_gap_max": GOAL_DEPTH_GAP},
              "summary": summary, "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(runs, args.norms, out.with_suffix(".png"))
    print(f"{'norm':<10} {'perplexity':>10} {'x LN':>6} {'depth':>6} {'gap':>6}  per seed")
    for norm, s in summary.items():
        print(f"{norm:<10} {s['perplexity_mean']:>10.3f} {s.get('perplexity_ratio_to_layernorm', math.nan):>6.3f} "
              f"{s['mean_token_depth']:>6.2f} {s.get('depth_gap_to_layernorm', math.nan):>+6.2f}  "
              f"{s['perplexity_per_seed']}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
