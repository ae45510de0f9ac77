"""Plots of the ACT tuner: heat maps over threshold × lambda and the perplexity/layers Pareto front."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ponder.plots import new_figure, save
from ponder.tune.report import pareto_front


def heatmaps_figure(results: list[dict[str, Any]], best: dict[str, float], score_name: str = "score") -> Any:
    """Left: validation perplexity; middle: avg layers executed; right: score. Each cell shows its value at its
    centre; the best cell has a white frame and a star in its corner."""
    import numpy as np
    from matplotlib.patches import Rectangle

    thresholds = sorted({r["threshold"] for r in results})
    lambdas = sorted({r["lambda"] for r in results})
    panels = [("final_val_perplexity", "Validation perplexity"), ("avg_layers_executed", "Avg layers executed"),
              ("score", f"Score ({score_name}, lower is better)")]
    fig = new_figure(figsize=(15, 4.4))
    axes = fig.subplots(1, 3)
    for ax, (key, title) in zip(axes, panels, strict=True):
        grid = np.full((len(lambdas), len(thresholds)), np.nan)
        for r in results:
            grid[lambdas.index(r["lambda"]), thresholds.index(r["threshold"])] = r[key]
        im = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
        for i in range(len(lambdas)):
            for j in range(len(thresholds)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8, color="black",
                            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "alpha": 0.6, "lw": 0})
        j, i = thresholds.index(best["threshold"]), lambdas.index(best["lambda"])
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="white", lw=3))
        ax.plot(j - 0.5 + 0.12, i + 0.5 - 0.14, marker="*", color="white", markersize=14, markeredgecolor="black")
        ax.set_xticks(range(len(thresholds)), [f"{t:g}" for t in thresholds])
        ax.set_yticks(range(len(lambdas)), [f"{v:g}" for v in lambdas])
        ax.set_xlabel("act_threshold")
        ax.set_ylabel("act_lambda")
        ax.set_title(title)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def plot_heatmaps(results: list[dict[str, Any]], best: dict[str, float], path: str | Path,
                  score_name: str = "score") -> Path:
    """``heatmaps_figure`` saved as a PNG."""
    return save(heatmaps_figure(results, best, score_name), path)


def pareto_figure(results: list[dict[str, Any]], best: dict[str, float] | None, n_layers: int) -> Any:
    """Perplexity against avg layers executed for every result; the Pareto front (both minimised) drawn. The legend
    sits below the plot, where it hides no point."""
    fig = new_figure(figsize=(7, 5.4))
    ax = fig.subplots()
    layers = [r["avg_layers_executed"] for r in results]
    ppl = [r["final_val_perplexity"] for r in results]
    sc = ax.scatter(layers, ppl, c=[r["threshold"] for r in results], cmap="viridis", s=36, zorder=2,
                    label="one setting (colour: act_threshold)")
    fig.colorbar(sc, ax=ax, label="act_threshold")
    front = pareto_front(list(zip(layers, ppl, strict=True)))
    ax.plot([layers[i] for i in front], [ppl[i] for i in front], "-o", color="tab:red", mfc="none", ms=10,
            label="Pareto front", zorder=3)
    if best is not None:
        b = next(r for r in results if r["threshold"] == best["threshold"] and r["lambda"] == best["lambda"])
        ax.plot(b["avg_layers_executed"], b["final_val_perplexity"], "*", color="gold", markeredgecolor="black",
                ms=18, label=f"best: threshold {b['threshold']:g}, lambda {b['lambda']:g}", zorder=4)
    ax.set_xlim(0.9, n_layers + 0.1)
    ax.set_xlabel(f"avg layers executed (of {n_layers})")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Quality against compute")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, markerscale=0.7,
              borderpad=0.8, handlelength=2.5)
    fig.tight_layout()
    return fig


def plot_pareto(results: list[dict[str, Any]], best: dict[str, float] | None, path: str | Path,
                n_layers: int) -> Path:
    """``pareto_figure`` saved as a PNG."""
    return save(pareto_figure(results, best, n_layers), path)
