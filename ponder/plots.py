"""Plots a person would rather look at than read. matplotlib is imported only here and in ``ponder.tune.plots``.

Each ``*_figure`` function builds a matplotlib Figure and returns it (to look at, test or save yourself); each
``plot_*`` function draws that figure into a PNG file. The figures belong to no window and no pyplot state, so
nothing needs a display or closing.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

PERPLEXITY_SPAN = 0.05  # the perplexity axis spans at least ±5% around the values, so noise looks like noise


def new_figure(**kwargs: Any) -> Any:
    """A matplotlib Figure that is not tied to pyplot, drawn by Agg (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def run_label(ckpt: str | Path) -> str:
    """How a plot title names a checkpoint: its run folder and the step, ``runs/mine/checkpoints/step-00000300`` ->
    ``"mine (step 300)"``. A checkpoint outside a run folder keeps its own folder name."""
    ckpt = Path(ckpt).resolve()
    match = re.fullmatch(r"step-(\d+)", ckpt.name)
    if ckpt.parent.name == "checkpoints" and match:
        return f"{ckpt.parent.parent.name} (step {int(match.group(1))})"
    return ckpt.name


def plot_eval(results: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Left: token-depth histogram per threshold. Right: perplexity and depth against threshold."""
    fig = new_figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2)
    n_layers = results[0]["n_layers"]
    width = 0.8 / len(results)
    for k, r in enumerate(results):
        total = sum(r["depth_histogram"]) or 1
        xs = [d + 1 + (k - (len(results) - 1) / 2) * width for d in range(n_layers)]
        left.bar(xs, [c / total for c in r["depth_histogram"]], width=width, label=f"threshold {r['threshold']:g}")
    left.set_xlabel("layers run by a token")
    left.set_ylabel("share of tokens")
    left.set_xticks(range(1, n_layers + 1))
    left.set_title("Token depth")
    left.legend(fontsize=8)

    thresholds = [r["threshold"] for r in results]
    right.plot(thresholds, [r["perplexity"] for r in results], "o-", color="tab:red", label="perplexity")
    right.set_xlabel("threshold")
    right.set_ylabel(f"perplexity (the axis spans at least ±{PERPLEXITY_SPAN:.0%})", color="tab:red")
    right.set_ylim(honest_range([r["perplexity"] for r in results]))
    depth_ax = right.twinx()
    depth_ax.plot(thresholds, [r["layers_executed"] for r in results], "s-", color="tab:blue",
                  label="layers executed (per batch)")
    depth_ax.plot(thresholds, [r["mean_token_depth"] for r in results], "^--", color="tab:cyan",
                  label="mean token depth")
    depth_ax.set_ylim(0, n_layers + 0.5)
    depth_ax.set_ylabel("layers", color="tab:blue")
    handles = right.get_legend_handles_labels()[0] + depth_ax.get_legend_handles_labels()[0]
    depth_ax.legend(handles=handles, loc="lower right", fontsize=8)
    right.set_title("Perplexity and depth against threshold")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save(fig, path)


def plot_norm_curves(io: dict[str, Any], fits: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """One small panel per norm layer: output (affine removed) against input, with the fitted tanh.

    ``io`` maps each layer's name to its (input, output) samples: tensors or arrays, anything ``np.asarray`` reads."""
    import numpy as np

    n = len(io)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = new_figure(figsize=(3.2 * cols, 2.8 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, ((name, (x, y)), fit) in zip(axes.flat, zip(io.items(), fits, strict=True), strict=False):
        x, y = np.asarray(x), np.asarray(y)
        ax.scatter(x, y, s=1, alpha=0.3, color="tab:blue", rasterized=True)
        grid = np.linspace(float(x.min()), float(x.max()), 200, dtype=np.float32)
        ax.plot(grid, fit["scale"] * np.tanh(fit["alpha"] * grid), color="tab:red", lw=1.2)
        ax.set_title(f"{name or 'model'}\nα={fit['alpha']:.3g}  R² tanh {fit['r2_tanh']:.3f} / line "
                     f"{fit['r2_linear']:.3f}", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.supxlabel("input")
    fig.supylabel("output (affine removed)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save(fig, path)


def line_styles(names: list[str]) -> dict[str, tuple[Any, Any]]:
    """A different (colour, line style) for every name. The colour follows the block (the first number in the name,
    ``blocks.3.norm_attn`` -> 3) and the line style the layer's place in its block (``norm_attn``); a name without a
    number is drawn in black."""
    from matplotlib import colormaps

    styles: list[Any] = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (8, 2)), (0, (1, 3))]
    keys = {}
    for name in names:
        match = re.search(r"\d+", name)
        keys[name] = (int(match.group()) if match else None, re.sub(r"\d+", "#", name, count=1))
    blocks = sorted({b for b, _ in keys.values() if b is not None})
    places = list(dict.fromkeys(p for _, p in keys.values()))
    if len(blocks) <= 10:
        colours: dict[Any, Any] = {b: f"C{k}" for k, b in enumerate(blocks)}
    else:
        colours = {b: colormaps["turbo"](k / (len(blocks) - 1)) for k, b in enumerate(blocks)}
    colours[None] = "black"
    out = {n: (colours[b], styles[places.index(p) % len(styles)]) for n, (b, p) in keys.items()}
    if len(places) > len(styles) or len(set(map(str, out.values()))) < len(names):  # no clean pattern: one colour each
        out = {n: (colormaps["turbo"](k / max(1, len(names) - 1)), "-") for k, n in enumerate(names)}
    return out


def alphas_figure(series: dict[str, list[tuple[int, float]]], title: str = "") -> Any:
    """Alpha of every DyT/ADyT layer against the training step: colour per block, line style per place."""
    fig = new_figure(figsize=(9, 4.5))
    ax = fig.subplots()
    looks = line_styles(list(series))
    for name, points in series.items():
        colour, style = looks[name]
        ax.plot([s for s, _ in points], [a for _, a in points], label=name, color=colour, linestyle=style, lw=1.4)
    ax.set_xlabel("step")
    ax.set_ylabel("alpha")
    if len(series) <= 30:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if len(series) <= 15 else 2)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_alphas(series: dict[str, list[tuple[int, float]]], path: str | Path, title: str = "") -> Path:
    """``alphas_figure`` saved as a PNG."""
    return save(alphas_figure(series, title), path)


def plot_dials(runs: dict[str, dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Loss and every dial against the step, one panel each; several runs share the panels."""
    dial_names = list(next(iter(runs.values()))["dials"])
    fig = new_figure(figsize=(8, 2.4 * (1 + len(dial_names))))
    axes = fig.subplots(1 + len(dial_names), 1, sharex=True, squeeze=False)[:, 0]
    for k, (label, s) in enumerate(runs.items()):
        color = f"C{k}"
        axes[0].plot(s["step"], s["loss"], color=color, lw=1, alpha=0.8, label=f"{label}: train")
        if s.get("valid_step"):
            axes[0].plot(s["valid_step"], s["valid_loss"], "o--", color=color, ms=3, label=f"{label}: valid")
        for ax, name in zip(axes[1:], dial_names, strict=True):
            ax.plot(s["step"], s["dials"][name], color=color, lw=1.2, label=label)
            ax.set_ylabel(name)
    axes[0].set_ylabel("loss")
    axes[0].legend(fontsize=7)
    axes[-1].set_xlabel("step")
    if len(runs) > 1 and len(axes) > 1:
        axes[1].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save(fig, path)


def bench_figure(report: dict[str, Any], title: str = "") -> Any:
    """``ponder bench``'s report (or the demo's) in four panels against the threshold, one colour per batch size:
    latency (p50, p95 dotted), depth (layers executed, mean token depth dashed), the measured speed-up with its two
    references (the dense layer loop's ideal and the per-token bound), and perplexity. The thresholds are evenly
    spaced, so 0.95, 0.99 and 1 stay apart."""
    fig = new_figure(figsize=(11, 8.6))
    (lat, layers), (speed, ppl) = fig.subplots(2, 2)
    rows = report["rows"]
    thresholds = sorted({r["threshold"] for r in rows})
    batches = sorted({r["batch_size"] for r in rows})
    for k, b in enumerate(batches):
        mine = sorted((r for r in rows if r["batch_size"] == b), key=lambda r: r["threshold"])
        xs = [thresholds.index(r["threshold"]) for r in mine]
        color, who = f"C{k}", (f"batch {b}: " if len(batches) > 1 else "")
        for ax, key, fmt, label, style in (
            (lat, "p50_ms", "o-", "p50", {}),
            (lat, "p95_ms", ":", "p95", {}),
            (layers, "layers_executed", "s-", "layers executed (the request)", {}),
            (layers, "mean_token_depth", "^--", "mean token depth (per token)", {}),
            (speed, "speedup", "o-", "measured (p50 at threshold 1 / p50)", {"lw": 2}),
            (speed, "ideal_speedup", "s--", "ideal, dense layer loop", {"ms": 4, "lw": 1}),
            (speed, "token_ideal_speedup", "^:", "bound, per token (compaction)", {"ms": 4, "lw": 1}),
            (ppl, "perplexity", "o-", "perplexity", {}),
        ):
            ax.plot(xs, [r[key] for r in mine], fmt, color=color, label=who + label, **style)

    lat.set(ylabel="latency per request (log scale)", title="Latency per request", yscale="log")
    _plain_log_ticks(lat, "ms")
    layers.set(ylabel="layers", title="Depth", ylim=(0, report["n_layers"] + 0.5))
    speed.set(ylabel="speed-up against threshold 1", title="Speed-up against full depth")
    speed.axhline(1.0, color="grey", lw=0.6)
    ppl.set(ylabel="perplexity", ylim=honest_range([r["perplexity"] for r in rows]),
            title=f"Perplexity (the axis spans at least ±{PERPLEXITY_SPAN:.0%})")
    for ax in (lat, layers, speed, ppl):
        ax.set_xticks(range(len(thresholds)), [f"{t:g}" for t in thresholds])
        ax.set_xlabel("threshold (evenly spaced)")
        ax.legend(fontsize=7)
    fig.suptitle(title or f"ponder bench: {report['model']} via {report['via']}, {report['n_layers']} layers, "
                          f"seq {report['seq_len']}, concurrency {report['concurrency']}")
    if "text" in report:
        fig.text(0.5, 0.01, text_line(report), ha="center", va="bottom", fontsize=8, wrap=True)
    fig.tight_layout(rect=(0, 0.035, 1, 1))
    return fig


def text_line(report: dict[str, Any]) -> str:
    """The line under a table or plot that says which text the perplexity is on, and how much of it was scored
    (request i at batch size b sends sequences i*b .. i*b+b-1, so a short run scores only the first ones)."""
    n = report["sequences"]
    scored = {b: min(report["requests"] * b, n) for b in sorted({r["batch_size"] for r in report["rows"]})}
    if all(count == n for count in scored.values()):
        which = "all of them"
    elif len(scored) == 1:
        which = f"the first {next(iter(scored.values()))}"
    else:
        which = ", ".join(f"batch {b}: {'all' if c == n else f'the first {c}'}" for b, c in scored.items())
    text = report.get("text", "the bench text")
    return f"perplexity on: {text}, {n} sequences of {report['seq_len']} tokens ({which} scored)"


def plot_bench(report: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """``bench_figure`` saved as a PNG."""
    return save(bench_figure(report, title), path)


def honest_range(values: list[float], span: float = PERPLEXITY_SPAN) -> tuple[float, float]:
    """Axis limits that show ``values`` and at least ±``span`` around their middle, so that a 0.5% wiggle does not
    fill the whole panel."""
    lo, hi = min(values), max(values)
    middle = (lo + hi) / 2
    lo, hi = min(lo, middle * (1 - span)), max(hi, middle * (1 + span))
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


def _plain_log_ticks(ax: Any, unit: str) -> None:
    """Ticks of a log-scale y axis written plainly ("8 ms"), not as powers of ten ("8×10⁰")."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    lo, hi = ax.get_ylim()
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    for steps in ((1, 2, 5), range(1, 10), (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9)):  # round values first
        ticks = [float(f"{m * 10.0 ** e:.3g}") for e in decades for m in steps if lo <= m * 10.0 ** e <= hi]
        if len(ticks) >= 4:
            break
    if len(ticks) < 2:  # a very narrow range: three values inside it, to two significant digits
        ticks = sorted({float(f"{lo * (hi / lo) ** f:.2g}") for f in (0.15, 0.5, 0.85)})
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g} {unit}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(lo, hi)


def save(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (its folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
