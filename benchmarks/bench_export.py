"""Early exit in ONNX Runtime, measured: latency per threshold against full depth, next to the ideal.

    python benchmarks/bench_export.py [--checkpoint runs/demo] [--repeats 40] [--out benchmarks/results/export.json]
                                      [--skip-compaction] [--skip-compile]

In one run, on the demo model (trained if missing) and real validation text: at batch 1 and 8,
ONNX Runtime latency at each threshold divided by the same graph's latency at threshold 1.0, next
to the ideal ratio layers_executed / n_layers; and the early-exit graph against an unrolled
fixed-depth export at full depth. Medians of interleaved repeats.

Compaction: the compacting export against the dense loop at every threshold and batch size, at
each ``compaction_cutoff`` in CUTOFFS (one graph; 0.0 always dense, 1.0 always compacted), next
to the ideal ``mean_token_depth / n_layers``; the cutoff with the least geometric-mean latency is
reported as the best one for this machine (the default in ``ponder.model`` came from here).

Peers: the default export (compaction auto) in fp32, bf16 and int8 (lowered as ``ponder export --precision`` lowers,
with its quality bound on validation text) against PyTorch eager and ``torch.compile``, at each batch size, at full
depth and at the trained threshold, all timed round-robin in one loop.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ponder import __version__
from ponder.checkpoint import load_model
from ponder.config import load_config
from ponder.data import TokenChunks, prepare_data
from ponder.export import export_model, session
from ponder.model_repository import decode_path
from ponder.precision import lower_checked, quality_inputs
from ponder.train import Trainer

THRESHOLDS = [0.5, 0.8, 0.9, 0.95, 0.99, 1.0]


CUTOFFS = [0.0, 0.25, 0.375, 0.5, 0.625, 0.75, 1.0]  # 0.0: the compacting graph always dense; 1.0: always compacted


def interleaved_ms(calls: dict, repeats: int) -> dict:
    """Median ms of each call, timed round-robin so that drift on a shared machine hits them all alike."""
    times = {k: [] for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def bench_compaction(loop, compact, chunks, args, n_layers: int, default_cutoff: float) -> dict:
    """The compacting graph against the dense loop at every threshold, batch size and cutoff."""
    cells = []
    for batch in args.batch_sizes:
        inputs = [chunks.batch(torch.arange(k * batch, (k + 1) * batch))[0].numpy() for k in range(4)]
        for ids in inputs:
            for t in THRESHOLDS:
                thr = np.array(t, np.float32)
                _, layers, depth = loop.run(None, {"input_ids": ids, "act_threshold": thr})
                calls = {"dense": lambda f={"input_ids": ids, "act_threshold": thr}: loop.run(None, f)}
                for c in CUTOFFS:
                    feed = {"input_ids": ids, "act_threshold": thr, "compaction_cutoff": np.array(c, np.float32)}
                    calls[c] = lambda f=feed: compact.run(None, f)
                for fn in calls.values():  # warm-up
                    fn()
                ms = interleaved_ms(calls, max(5, args.repeats // 2))
                cells.append({"batch_size": batch, "threshold": t, "layers_executed": int(layers),
                              "mean_token_depth": float(depth.mean()), "dense_ms": ms.pop("dense"),
                              "cutoff_ms": {str(c): v for c, v in ms.items()}})
    # the cutoff that serves every cell best: least geometric-mean latency against the dense loop
    def cost(c):
        return statistics.geometric_mean(cell["cutoff_ms"][str(c)] / cell["dense_ms"] for cell in cells)

    best = min(CUTOFFS[1:], key=cost)
    rows = []
    for batch in args.batch_sizes:
        full = statistics.mean(c["dense_ms"] for c in cells if c["batch_size"] == batch and c["threshold"] == 1.0)
        for t in THRESHOLDS:
            group = [c for c in cells if c["batch_size"] == batch and c["threshold"] == t]
            dense = statistics.mean(c["dense_ms"] for c in group)
            auto = statistics.mean(c["cutoff_ms"][str(default_cutoff)] for c in group)
            on = statistics.mean(c["cutoff_ms"]["1.0"] for c in group)
            layers = statistics.mean(c["layers_executed"] for c in group)
            depth = statistics.mean(c["mean_token_depth"] for c in group)
            row = {"batch_size": batch, "threshold": t, "layers_executed": layers, "mean_token_depth": depth,
                   "dense_ms": dense, "auto_ms": auto, "on_ms": on, "auto_vs_dense": auto / dense,
                   "on_vs_dense": on / dense, "auto_vs_full_depth": auto / full, "ideal": depth / n_layers}
            if t == 1.0:  # the compacting graph costs nothing where nothing halts
                row["goal"], row["meets_goal"] = 1.03, row["auto_vs_dense"] <= 1.03
            elif t == 0.5:  # against full depth: what early exit plus compaction buys
                row["goal"] = 0.40 if batch == 1 else 0.45
                row["meets_goal"] = row["auto_vs_full_depth"] <= row["goal"]
            rows.append(row)
    return {"cutoffs": CUTOFFS, "default_cutoff": default_cutoff, "best_cutoff": best,
            "geomean_vs_dense": {str(c): cost(c) for c in CUTOFFS}, "rows": rows, "cells": cells}


PEER_GOALS = {"ort_vs_eager": {1: 1.3, 8: 1.1}, "int8_vs_fp32_b8": 1.5}


def lowered_copies(model, graph: Path, folder: Path, samples) -> tuple[dict[str, Path], dict[str, list]]:
    """The export at ``graph`` lowered to bf16 and int8 (copies in ``folder``), as ``ponder export --precision``
    lowers and bounds it; the paths by precision and each one's quality rows."""
    paths, quality = {"fp32": graph}, {}
    for precision in ("bf16", "int8"):
        target = folder / precision / "model.onnx"
        target.parent.mkdir(parents=True)
        shutil.copyfile(graph, target)
        shutil.copyfile(decode_path(graph), decode_path(target))
        try:
            quality[precision] = lower_checked(model, target, decode_path(target), precision, samples)
            paths[precision] = target
        except Exception as exc:  # outside the bound: reported, not timed
            quality[precision] = [{"refused": str(exc)}]
    return paths, quality


def try_compile(model, inputs: list, thresholds: list[float]):
    """``torch.compile(model)`` warmed on every (input, threshold) it will be timed at, and the seconds that took;
    (None, the error) where it does not run here."""
    started = time.perf_counter()
    try:
        compiled = torch.compile(model)
        with torch.no_grad():
            for ids in inputs:
                for t in thresholds:
                    compiled(ids, threshold=t)
                    compiled(ids, threshold=t)
    except Exception as exc:  # inductor needs a C++ compiler, among others
        return None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
    return compiled, time.perf_counter() - started


def bench_peers(model, run, chunks, paths: dict[str, Path], args) -> dict:
    """Each ONNX Runtime precision against PyTorch eager and torch.compile, interleaved, per batch and threshold."""
    sessions = {p: session(path, spin=False) for p, path in paths.items()}
    thresholds = [1.0, run.model.act_threshold]
    inputs = {b: chunks.batch(torch.arange(0, b))[0] for b in args.batch_sizes}
    compiled, compile_note = (None, "skipped (--skip-compile)") if args.skip_compile else \
        try_compile(model, list(inputs.values()), thresholds)
    rows = []
    for batch, ids in inputs.items():
        for t in thresholds:
            feed = {"input_ids": ids.numpy(), "act_threshold": np.array(t, np.float32)}
            calls = {f"ort_{p}": (lambda s=s, f=feed: s.run(None, f)) for p, s in sessions.items()}
            calls["eager"] = lambda x=ids, t=t: _no_grad(model, x, t)
            if compiled is not None:
                calls["compile"] = lambda x=ids, t=t: _no_grad(compiled, x, t)
            for fn in calls.values():
                fn()
            ms = interleaved_ms(calls, args.repeats)
            row = {"batch_size": batch, "threshold": t, "ms": ms,
                   "ort_vs_eager": ms["eager"] / ms["ort_fp32"]}
            if "compile" in ms:
                row["ort_vs_compile"] = ms["compile"] / ms["ort_fp32"]
            for p in ("bf16", "int8"):
                if f"ort_{p}" in ms:
                    row[f"{p}_vs_fp32"] = ms["ort_fp32"] / ms[f"ort_{p}"]
            goal = PEER_GOALS["ort_vs_eager"].get(batch)
            if goal is not None:
                ahead = row.get("ort_vs_compile", math.inf) > 1  # of torch.compile, where it runs
                row["goal"], row["meets_goal"] = goal, row["ort_vs_eager"] >= goal and ahead
            rows.append(row)
    return {"compile": compile_note if compiled is None else f"compiled and warmed in {compile_note:.0f} s",
            "rows": rows}


def bench_decode(model, run, chunks, paths: dict[str, Path], args) -> list[dict]:
    """One generated token through each precision's decode graph after a 64-token prefill, per batch size and
    threshold: the step a generating client waits for, interleaved across precisions."""
    from ponder.decode_graph import cache_names

    cfg = model.cfg
    past_names, present_names = cache_names(cfg.n_layers)
    sessions = {p: session(decode_path(path), spin=False) for p, path in paths.items()}
    rows = []
    for batch in args.batch_sizes:
        ids = chunks.batch(torch.arange(0, batch))[0].numpy()
        prompt, new = ids[:, :64], ids[:, 64:65]
        for t in (1.0, run.model.act_threshold):
            calls = {}
            for p, sess in sessions.items():
                empty = np.zeros((batch, cfg.n_heads, 0, cfg.d_model // cfg.n_heads), np.float32)
                feed = {"input_ids": prompt, "attention_mask": np.ones_like(prompt),
                        "act_threshold": np.array(t, np.float32), **dict.fromkeys(past_names, empty)}
                out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed), strict=True))
                step = {"input_ids": new, "attention_mask": np.ones((batch, 65), np.int64),
                        "act_threshold": np.array(t, np.float32),
                        **{a: out[b] for a, b in zip(past_names, present_names, strict=True)}}
                calls[f"ort_{p}"] = lambda s=sess, f=step: s.run(None, f)
            for fn in calls.values():
                fn()
            ms = interleaved_ms(calls, args.repeats * 2)
            row = {"batch_size": batch, "threshold": t, "ms": ms}
            for p in ("bf16", "int8"):
                if f"ort_{p}" in ms:
                    row[f"{p}_vs_fp32"] = ms["ort_fp32"] / ms[f"ort_{p}"]
            rows.append(row)
    return rows


def _no_grad(model, ids, threshold):
    with torch.no_grad():
        return model(ids, threshold=threshold)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="runs/demo")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", default="benchmarks/results/export.json")
    parser.add_argument("--skip-compaction", action="store_true", help="leave out the compaction measurements")
    parser.add_argument("--skip-compile", action="store_true",
                        help="leave torch.compile out of the peers (it compiles for minutes on 2 cores)")
    args = parser.parse_args(argv)
    ckpt = Path(args.checkpoint)
    if not (ckpt / "latest").exists() and not (ckpt / "config.json").exists():
        print(f"training the demo model into {ckpt}...", file=sys.stderr)
        Trainer(load_config(preset="demo"), ckpt).train()
    model, tokenizer, run = load_model(ckpt)
    chunks = TokenChunks(prepare_data(run.data, tokenizer).splits["valid"], run.train.seq_len)
    n_layers = model.cfg.n_layers
    rows, comparisons, compaction = [], [], None
    with tempfile.TemporaryDirectory() as tmp:
        print("exporting the early-exit graph and an unrolled fixed-depth one...", file=sys.stderr)
        export_model(model, Path(tmp) / "loop.onnx", compaction="off")
        export_model(model, Path(tmp) / "unrolled.onnx", unrolled=True)
        loop, unrolled = session(Path(tmp) / "loop.onnx", spin=False), session(Path(tmp) / "unrolled.onnx", spin=False)
        print("exporting the default graph (compaction auto) and lowering it to bf16 and int8...", file=sys.stderr)
        export_model(model, Path(tmp) / "compact.onnx", compaction="auto")
        valid = prepare_data(run.data, tokenizer).splits["valid"]
        paths, quality = lowered_copies(model, Path(tmp) / "compact.onnx", Path(tmp),
                                        quality_inputs(model, valid) or [chunks.batch(torch.arange(0, 8))[0]])
        print("timing ONNX Runtime (fp32, bf16, int8) against PyTorch eager and torch.compile...", file=sys.stderr)
        peers = bench_peers(model, run, chunks, paths, args)
        peers["quality"] = quality
        peers["decode"] = bench_decode(model, run, chunks, paths, args)
        if not args.skip_compaction:
            # threads that do not busy-wait after a call, so two sessions timed in turn do not slow each other
            compaction = bench_compaction(session(Path(tmp) / "loop.onnx", spin=False),
                                          session(Path(tmp) / "compact.onnx", spin=False), chunks, args, n_layers,
                                          model.compaction_cutoff)
        for batch in args.batch_sizes:
            # several different inputs, each timed at every threshold, so one lucky window does not decide
            inputs = [chunks.batch(torch.arange(k * batch, (k + 1) * batch))[0] for k in range(4)]
            per = {t: {"ms": [], "layers": []} for t in THRESHOLDS}
            overhead = {"loop": [], "unrolled": []}
            for ids in inputs:  # every threshold of one input round-robin, and the unrolled graph beside full depth
                feeds = {t: {"input_ids": ids.numpy(), "act_threshold": np.array(t, np.float32)} for t in THRESHOLDS}
                calls = {t: (lambda f=f: loop.run(None, f)) for t, f in feeds.items()}
                calls["unrolled"] = lambda f=feeds[1.0]: unrolled.run(None, f)
                for fn in calls.values():  # warm-up
                    fn()
                ms = interleaved_ms(calls, args.repeats)
                for t in THRESHOLDS:
                    per[t]["ms"].append(ms[t])
                    per[t]["layers"].append(int(loop.run(None, feeds[t])[1]))
                overhead["loop"].append(ms[1.0])
                overhead["unrolled"].append(ms["unrolled"])
            full = statistics.mean(per[1.0]["ms"])
            for t in THRESHOLDS:
                ms = statistics.mean(per[t]["ms"])
                layers = statistics.mean(per[t]["layers"])
                ratio, ideal = ms / full, layers / n_layers
                rows.append({"batch_size": batch, "threshold": t, "latency_ms": ms, "layers_executed": layers,
                             "latency_ratio": ratio, "ideal_ratio": ideal, "goal": 1.1 * ideal + 0.05,
                             "meets_goal": ratio <= 1.1 * ideal + 0.05})
            loop_ms, unrolled_ms = statistics.mean(overhead["loop"]), statistics.mean(overhead["unrolled"])
            comparisons.append({"batch_size": batch, "full_depth_loop_ms": loop_ms,
                                "full_depth_unrolled_ms": unrolled_ms, "loop_overhead": loop_ms / unrolled_ms - 1})
    report = {"ponder_version": __version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.machine(), "n_layers": n_layers, "seq_len": run.train.seq_len,
              "thresholds": rows, "comparisons": comparisons, "compaction": compaction, "peers": peers}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'batch':>5} {'threshold':>9} {'ms':>8} {'layers':>6} {'ratio':>6} {'ideal':>6} {'goal':>6}")
    for r in rows:
        miss = "" if r["meets_goal"] else " MISS"
        print(f"{r['batch_size']:>5} {r['threshold']:>9g} {r['latency_ms']:>8.2f} {r['layers_executed']:>6.2f} "
              f"{r['latency_ratio']:>6.2f} {r['ideal_ratio']:>6.2f} {r['goal']:>6.2f}{miss}")
    for c in comparisons:
        print(f"batch {c['batch_size']}: full depth loop {c['full_depth_loop_ms']:.2f} ms vs unrolled "
              f"{c['full_depth_unrolled_ms']:.2f} ms (overhead {c['loop_overhead']:+.1%}); against PyTorch: the peers")
    if compaction:
        print(f"compaction (auto at cutoff {compaction['default_cutoff']:g}; the best cutoff measured here: "
              f"{compaction['best_cutoff']:g}); ratios against the dense loop at the same threshold")
        print(f"{'batch':>5} {'threshold':>9} {'layers':>6} {'depth':>5} {'dense ms':>8} {'auto ms':>8} {'auto':>6} "
              f"{'on':>6} {'vs full':>7} {'ideal':>6} {'goal':>5}")
        for r in compaction["rows"]:
            goal = f"{r['goal']:>5.2f}{'' if r['meets_goal'] else ' MISS'}" if "goal" in r else ""
            print(f"{r['batch_size']:>5} {r['threshold']:>9g} {r['layers_executed']:>6.2f} "
                  f"{r['mean_token_depth']:>5.2f} "
                  f"{r['dense_ms']:>8.2f} {r['auto_ms']:>8.2f} {r['auto_vs_dense']:>5.2f}x {r['on_vs_dense']:>5.2f}x "
                  f"{r['auto_vs_full_depth']:>6.2f}x {r['ideal']:>5.2f}x {goal}")
    print(f"peers (torch.compile: {peers['compile']}); ms, and ratios: speed-up of ORT fp32 over eager and "
          f"compile, of bf16 and int8 over fp32")
    names = list(peers["rows"][0]["ms"])
    print(f"{'batch':>5} {'threshold':>9} " + " ".join(f"{n:>9}" for n in names)
          + f" {'vs eager':>8} {'vs comp':>7} {'bf16':>5} {'int8':>5} {'goal':>5}")
    for r in peers["rows"]:
        goal = f"{r['goal']:>5.2f}{'' if r['meets_goal'] else ' MISS'}" if "goal" in r else ""
        print(f"{r['batch_size']:>5} {r['threshold']:>9g} " + " ".join(f"{r['ms'][n]:>9.2f}" for n in names)
              + f" {r['ort_vs_eager']:>7.2f}x {r.get('ort_vs_compile', float('nan')):>6.2f}x "
              f"{r.get('bf16_vs_fp32', float('nan')):>4.2f}x {r.get('int8_vs_fp32', float('nan')):>4.2f}x {goal}")
    print("decode: one token after a 64-token prefill, ms per precision (ratio to fp32)")
    for r in peers["decode"]:
        print(f"{r['batch_size']:>5} {r['threshold']:>9g} " + "  ".join(
            f"{p[4:]} {v:.3f} ({r['ms']['ort_fp32'] / v:.2f}x)" for p, v in r["ms"].items()))
    for precision, rows_q in peers["quality"].items():
        for q in rows_q:
            print(f"{precision}: " + (q["refused"] if "refused" in q else
                  f"{q['graph']} graph at threshold {q['threshold']:g}: perplexity {q['perplexity']:.4f} against "
                  f"{q['perplexity_fp32']:.4f} ({q['perplexity_ratio'] - 1:+.2%}), argmax agreement "
                  f"{q['argmax_agreement']:.2%} of {q['tokens']} tokens"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
