"""Plots of the ACT tuner: heat maps over threshold × lambda and the perplexity/layers Pareto front."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ponder.plots import _pyplot, _save


def plot_heatmaps(results: list[dict[str, Any]], best: dict[str, float], path: str | Path,
                  score_name: str = "score") -> Path:
    """Left: validation perplexity; middle: avg layers executed; right: score. A white star on the best cell."""
    import numpy as np

    plt = _pyplot()
    thresholds = sorted({r["threshold"] for r in results})
    lambdas = sorted({r["lambda"] for r in results})
    panels = [("final_val_perplexity", "Validation perplexity"), ("avg_layers_executed", "Avg layers executed"),
              ("score", f"Score ({score_name}, lower is better)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for ax, (key, title) in zip(axes, panels, strict=True):
        grid = np.full((len(lambdas), len(thresholds)), np.nan)
        for r in results:
            grid[lambdas.index(r["lambda"]), thresholds.index(r["threshold"])] = r[key]
        im = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
        for i in range(len(lambdas)):
            for j in range(len(thresholds)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i - 0.3, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7, color="black",
                            bbox={"boxstyle": "round,pad=0.1", "fc": "white", "alpha": 0.5, "lw": 0})
        ax.plot(thresholds.index(best["threshold"]), lambdas.index(best["lambda"]), marker="*", color="white",
                markersize=22, markeredgecolor="black")
        ax.set_xticks(range(len(thresholds)), [f"{t:g}" for t in thresholds])
        ax.set_yticks(range(len(lambdas)), [f"{v:g}" for v in lambdas])
        ax.set_xlabel("act_threshold")
        ax.set_ylabel("act_lambda")
        ax.set_title(title)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_pareto(results: list[dict[str, Any]], best: dict[str, float] | None, path: str | Path,
                n_layers: int) -> Path:
    """Perplexity against avg layers executed for every result; the Pareto front (both minimised) drawn."""
    from ponder.tune import pareto_front

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    layers = [r["avg_layers_executed"] for r in results]
    ppl = [r["final_val_perplexity"] for r in results]
    sc = ax.scatter(layers, ppl, c=[r["threshold"] for r in results], cmap="viridis", s=36, zorder=2)
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
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)
