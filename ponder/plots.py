"""Plots a person would rather look at than read. matplotlib is imported only here (Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_eval(results: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Left: token-depth histogram per threshold. Right: perplexity and depth against threshold."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
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
    right.set_ylabel("perplexity", color="tab:red")
    depth_ax = right.twinx()
    depth_ax.plot(thresholds, [r["layers_executed"] for r in results], "s-", color="tab:blue",
                  label="layers executed (per batch)")
    depth_ax.plot(thresholds, [r["mean_token_depth"] for r in results], "^--", color="tab:cyan",
                  label="mean token depth")
    depth_ax.set_ylim(0, n_layers + 0.5)
    depth_ax.set_ylabel("layers", color="tab:blue")
    handles = right.get_legend_handles_labels()[0] + depth_ax.get_legend_handles_labels()[0]
    depth_ax.legend(handles=handles, loc="center left", fontsize=8)
    right.set_title("Perplexity and depth against threshold")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_norm_curves(io: dict[str, Any], fits: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """One small panel per norm layer: output (affine removed) against input, with the fitted tanh."""
    import math

    import torch

    plt = _pyplot()
    n = len(io)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for ax, ((name, (x, y)), fit) in zip(axes.flat, zip(io.items(), fits, strict=True), strict=False):
        ax.scatter(x.numpy(), y.numpy(), s=1, alpha=0.3, color="tab:blue", rasterized=True)
        grid = torch.linspace(float(x.min()), float(x.max()), 200)
        ax.plot(grid.numpy(), (fit["scale"] * torch.tanh(fit["alpha"] * grid)).numpy(), color="tab:red", lw=1.2)
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
    return _save(fig, plt, path)


def plot_alphas(series: dict[str, list[tuple[int, float]]], path: str | Path, title: str = "") -> Path:
    """Alpha of every DyT/ADyT layer against the training step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, points in series.items():
        ax.plot([s for s, _ in points], [a for _, a in points], label=name, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("alpha")
    if len(series) <= 20:
        ax.legend(fontsize=6, ncol=2)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_dials(runs: dict[str, dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Loss and every dial against the step, one panel each; several runs share the panels."""
    plt = _pyplot()
    dial_names = list(next(iter(runs.values()))["dials"])
    fig, axes = plt.subplots(1 + len(dial_names), 1, figsize=(8, 2.4 * (1 + len(dial_names))), sharex=True)
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
    if len(runs) > 1:
        axes[1].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_bench(report: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Four panels against the threshold, one line per batch size: p50 latency (p95 dotted), layers executed
    (mean token depth dashed), perplexity; and the measured speed-up against the ideal one with the y = x line."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (lat, layers), (speed, ppl) = axes
    batches = sorted({r["batch_size"] for r in report["rows"]})
    top = 1.0
    for k, b in enumerate(batches):
        rows = sorted((r for r in report["rows"] if r["batch_size"] == b), key=lambda r: r["threshold"])
        color, label = f"C{k}", f"batch {b}"
        ts = [r["threshold"] for r in rows]
        lat.plot(ts, [r["p50_ms"] for r in rows], "o-", color=color, label=f"{label} p50")
        lat.plot(ts, [r["p95_ms"] for r in rows], ":", color=color, label=f"{label} p95")
        layers.plot(ts, [r["layers_executed"] for r in rows], "s-", color=color, label=f"{label} layers executed")
        layers.plot(ts, [r["mean_token_depth"] for r in rows], "^--", color=color, label=f"{label} mean token depth")
        ppl.plot(ts, [r["perplexity"] for r in rows], "o-", color=color, label=label)
        ideal, measured = [r["ideal_speedup"] for r in rows], [r["speedup"] for r in rows]
        speed.plot(ideal, measured, "o", color=color, label=label)
        for r in rows:
            speed.annotate(f"{r['threshold']:g}", (r["ideal_speedup"], r["speedup"]), fontsize=7,
                           xytext=(3, 3), textcoords="offset points")
        top = max(top, *ideal, *measured)
    speed.plot([1, top * 1.05], [1, top * 1.05], "k--", lw=1, label="ideal (cost = layers executed)")
    lat.set(xlabel="threshold", ylabel="latency (ms, log scale)", title="Latency per request", yscale="log")
    layers.set(xlabel="threshold", ylabel="layers", title="Depth", ylim=(0, report["n_layers"] + 0.5))
    ppl.set(xlabel="threshold", ylabel="perplexity", title="Perplexity on the bench text")
    speed.set(xlabel="ideal speed-up (n_layers / layers executed)", ylabel="measured speed-up (p50, vs threshold 1)",
              title="Measured against ideal speed-up (labels: threshold)")
    for ax in (lat, layers, ppl, speed):
        ax.legend(fontsize=7)
    fig.suptitle(title or f"ponder bench: {report['model']} via {report['via']}, {report['n_layers']} layers, "
                          f"seq {report['seq_len']}, concurrency {report['concurrency']}")
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
