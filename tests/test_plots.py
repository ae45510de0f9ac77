"""The plots say what they mean: both speed-up references, plain latency ticks, an honest perplexity range, one look
per alpha line, centred heat-map labels, a legend that hides nothing, and titles that name the run."""

from __future__ import annotations

import json
from itertools import combinations

import pytest
from matplotlib.colors import to_rgba

from ponder.plots import alphas_figure, bench_figure, honest_range, line_styles, run_label
from ponder.serve.bench import EMBEDDED_TEXT, text_line
from ponder.tune.plots import heatmaps_figure, pareto_figure

N_LAYERS = 6


def _bench_report(batch_sizes=(1, 8), requests=50) -> dict:
    rows = []
    for b in batch_sizes:
        for t, layers, depth, ms, ppl in ((0.5, 5.1, 2.15, 7.3, 5.369), (0.9, 5.31, 2.43, 7.4, 5.283),
                                          (0.95, 5.33, 2.48, 7.6, 5.281), (0.99, 5.35, 2.55, 7.7, 5.281),
                                          (1.0, 6.0, 6.0, 10.1, 5.292)):
            rows.append({"threshold": t, "batch_size": b, "p50_ms": ms * b, "p95_ms": ms * b * 1.3,
                         "layers_executed": layers, "mean_token_depth": depth, "perplexity": ppl,
                         "speedup": 10.1 / ms, "ideal_speedup": N_LAYERS / layers,
                         "token_ideal_speedup": N_LAYERS / depth})
    return {"model": "mine", "via": "inprocess", "n_layers": N_LAYERS, "seq_len": 128, "sequences": 180,
            "requests": requests, "concurrency": 1, "text": EMBEDDED_TEXT, "rows": rows}


def _panel(fig, title: str):
    return next(ax for ax in fig.axes if ax.get_title().startswith(title))


def test_bench_figure_draws_both_speedup_references_with_their_values():
    report = _bench_report()
    speed = _panel(bench_figure(report), "Speed-up")
    lines = {line.get_label(): line for line in speed.get_lines()}
    for b in (1, 8):
        rows = [r for r in report["rows"] if r["batch_size"] == b]
        for label, key in (("ideal, dense layer loop", "ideal_speedup"),
                           ("bound, per token (compaction)", "token_ideal_speedup"),
                           ("measured (p50 at threshold 1 / p50)", "speedup")):
            line = lines[f"batch {b}: {label}"]
            assert list(line.get_ydata()) == pytest.approx([r[key] for r in rows])
    one = _panel(bench_figure(_bench_report(batch_sizes=(1,))), "Speed-up")  # one batch size: no "batch 1:" prefix
    assert {"ideal, dense layer loop", "bound, per token (compaction)"} <= {x.get_label() for x in one.get_lines()}


def test_bench_figure_latency_ticks_are_plain_milliseconds():
    fig = bench_figure(_bench_report())
    fig.canvas.draw()
    lat = _panel(fig, "Latency")
    labels = [t.get_text() for t in lat.get_yticklabels() if t.get_text()]
    assert len(labels) >= 3
    for text in labels:
        assert "10^" not in text and "×" not in text and text.endswith(" ms"), labels
        float(text.removesuffix(" ms"))  # a plain number
    minor = [t.get_text() for t in lat.get_yticklabels(minor=True) if t.get_text()]
    assert minor == []


def test_bench_figure_perplexity_axis_is_honest_and_names_the_text():
    report = _bench_report()
    fig = bench_figure(report)
    lo, hi = _panel(fig, "Perplexity").get_ylim()
    values = [r["perplexity"] for r in report["rows"]]
    middle = (min(values) + max(values)) / 2
    assert lo <= middle * 0.95 and hi >= middle * 1.05  # the values span 1.7%; the axis at least ±5%
    footnotes = [t.get_text() for t in fig.texts]
    assert any(t.startswith(f"perplexity on: {EMBEDDED_TEXT}, 180 sequences of 128 tokens") for t in footnotes)
    assert "mine" in fig.get_suptitle()


def test_honest_range_keeps_wide_values_whole():
    lo, hi = honest_range([2.0, 8.0])
    assert lo < 2.0 and hi > 8.0 and hi - lo < 7.0


def test_text_line_says_which_text_and_how_much_was_scored():
    assert text_line(_bench_report(batch_sizes=(1,), requests=100)) == \
        f"perplexity on: {EMBEDDED_TEXT}, 180 sequences of 128 tokens (the first 100 scored)"
    assert text_line(_bench_report(batch_sizes=(1, 8))).endswith("(batch 1: the first 50, batch 8: all scored)")
    assert text_line(_bench_report(batch_sizes=(4,), requests=50)).endswith("(all of them scored)")


def _alpha_names(blocks: int) -> list[str]:
    return [f"blocks.{b}.{p}" for b in range(blocks) for p in ("norm_attn", "norm_ffn")] + ["norm_final"]


def test_every_alpha_line_looks_different():
    names = _alpha_names(6)  # 13 lines: more than the 10 default colours
    series = {name: [(0, 1.0 + k / 10), (10, 0.5 + k / 10)] for k, name in enumerate(names)}
    fig = alphas_figure(series, title="DyT alpha over training: mine")
    looks = [(to_rgba(line.get_color()), line.get_linestyle()) for line in fig.axes[0].get_lines()]
    assert len(looks) == 13
    for a, b in combinations(looks, 2):
        assert a != b
    # colour follows the block, line style the place in it
    assert looks[0][0] == looks[1][0] and looks[0][1] != looks[1][1] and looks[0][1] == looks[2][1]


@pytest.mark.parametrize("names", [_alpha_names(24), [f"layer{k}" for k in range(40)], ["a", "b", "c"],
                                   [f"net.{k}.norm{j}" for k in range(3) for j in range(12)]])
def test_line_styles_are_distinct_for_any_names(names):
    looks = line_styles(names)
    assert len({(str(to_rgba(c)), str(s)) for c, s in looks.values()}) == len(names)


def _tuning_results() -> tuple[list[dict], dict]:
    results = []
    for lam, ppls, layers in ((0.01, (6.52, 6.31, 6.30, 6.32), (4.0, 4.0, 4.0, 4.0)),
                              (0.1, (7.26, 7.21, 7.19, 7.18), (10 / 3, 10 / 3, 11 / 3, 4.0))):
        for t, ppl, n in zip((0.5, 0.8, 0.9, 1.0), ppls, layers, strict=True):
            results.append({"threshold": t, "lambda": lam, "final_val_perplexity": ppl, "avg_layers_executed": n,
                            "score": ppl + 10 * n})
    return results, {"threshold": 0.8, "lambda": 0.1}


def test_heatmap_labels_sit_at_cell_centres():
    results, best = _tuning_results()
    fig = heatmaps_figure(results, best, "balanced")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 3
    for ax, key in zip(panels, ("final_val_perplexity", "avg_layers_executed", "score"), strict=True):
        at = {tuple(map(float, text.get_position())): text.get_text() for text in ax.texts}
        assert len(ax.texts) == len(at) == len(results)
        for r in results:  # column = threshold, row = lambda, both counted from 0: the cell's centre
            j, i = (0.5, 0.8, 0.9, 1.0).index(r["threshold"]), (0.01, 0.1).index(r["lambda"])
            assert at[(j, i)] == f"{r[key]:.2f}"
        assert all(t.get_ha() == "center" and t.get_va() == "center" for t in ax.texts)


def test_pareto_legend_hides_no_point_and_shows_every_marker():
    results, best = _tuning_results()
    fig = pareto_figure(results, best, 4)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend = ax.get_legend()
    frame = legend.get_frame().get_window_extent(renderer)
    assert not frame.overlaps(ax.get_window_extent(renderer))  # outside the data area
    assert [t.get_text() for t in legend.get_texts()][-1] == "best: threshold 0.8, lambda 0.1"
    for handle in legend.legend_handles:
        box = handle.get_window_extent(renderer)
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1


def test_titles_name_the_run_not_the_checkpoint_folder(tmp_path, monkeypatch):
    assert run_label(tmp_path / "runs" / "mine" / "checkpoints" / "step-00000300") == "mine (step 300)"
    assert run_label(tmp_path / "exported") == "exported"

    import ponder.plots
    from ponder.analyze import analyze_alphas

    run = tmp_path / "mine"
    run.mkdir()
    records = [{"step": s, "split": "train", "norms": {"blocks.0.norm_attn": {"alpha": 0.5 + s / 100}}}
               for s in (2, 4)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    titles = []
    monkeypatch.setattr(ponder.plots, "plot_alphas", lambda series, path, title="": titles.append(title))
    monkeypatch.chdir(run)
    analyze_alphas(".")  # from inside the run folder, "." still names it
    assert titles == ["DyT alpha over training: mine"]


def test_figures_save_as_png(tmp_path):
    from ponder.plots import plot_bench

    path = plot_bench(_bench_report(), tmp_path / "sub" / "bench.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
