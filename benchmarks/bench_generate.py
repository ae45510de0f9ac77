"""Generation through the KV cache against re-running the whole window, per threshold and context, with the bound.

    python benchmarks/bench_generate.py [--checkpoint runs/demo] [--repeats 6] [--tokens 8]
                                        [--contexts 16 64 120] [--out benchmarks/results/generate.json]

In one run, on the demo model (trained if missing) and its validation text, on ONNX Runtime: for each context
length and threshold, ``--tokens`` greedy tokens generated two ways, interleaved call by call:

- **recompute**: what the engine did before the decode graph: the scoring graph (model.onnx) on the whole window
  for every new token;
- **cached**: the decode graph (decode.onnx): one prefill of the context, then one token per step through the
  cache.

Both run as the engine runs them: the scoring graph on ONNX Runtime's intra-op threads (torch's thread count),
the decode graph on ``DECODE_THREADS`` (one).

Per cell: tokens/s and per-token latency p50/p99 of both, the prefill of the prompt (the decode graph with an empty
cache) against one forward of the scoring graph on the same prompt (alternating, ``PREFILL_PAIRS`` each per
prompt), and the cached decode's speed-up over full depth next to its exact bound.

The bound: a decode step of depth d costs ``c0 + d * f + (L - d) * k`` (``f`` one layer's full step, ``k`` one
layer's key/value fill, ``c0`` the rest: embedding, RoPE tables, the head). Both ends are measured in the real graph,
interleaved with the rest: ``T_L`` at threshold 1.0 (every layer full) and ``T_1`` at a threshold so low that every
token halts after layer 0 (one full layer, L - 1 fills). So ``f - k = (T_L - T_1) / (L - 1)`` and the bound of a step
of depth d is ``T_1 + (d - 1) * (f - k)``; the bound's speed-up at a threshold is ``T_L`` over the mean bound of its
steps' measured depths. Medians of the step times throughout (a shared machine's few slow steps would move a
mean). ``f`` and ``k`` are also timed on their own (the traced pieces the graph is assembled from, on
ONNX Runtime without its fixed cost per call) and reported beside.
"""

from __future__ import annotations

import argparse
import json
import platform
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
from ponder.data import prepare_data
from ponder.export import export_model, fold_norms
from ponder.generation import SamplingParams
from ponder.onnx_runtime import open_session
from ponder.serve.engine import DECODE_THREADS, Engine
from ponder.train import Trainer

THRESHOLDS = [0.5, 0.8, 0.9, 0.95, 0.99, 1.0]
FLOOR = 1e-6  # a threshold every token reaches after layer 0: decode steps of depth 1
GOAL_CACHED_OVER_RECOMPUTE = 15.0  # at full depth and a 120-token context
GOAL_BOUND_SHARE = 0.85  # measured speed-up over full depth, as a share of the exact bound
PIECE_REPEATS = 400
PREFILL_PAIRS = 5  # per prompt and threshold: the prefill and one forward of the scoring graph, alternating


def recompute(engine: Engine, prompt: list[int], tokens: int, threshold: float) -> list[float]:
    """Greedy tokens by re-running the scoring graph on the whole window each time; per-token seconds."""
    ids, times = list(prompt), []
    for _ in range(tokens):
        start = time.perf_counter()
        result = engine.infer(np.array([ids[-engine.max_seq_len:]], dtype=np.int64), threshold)
        ids.append(int(result.logits[0, -1].argmax()))
        times.append(time.perf_counter() - start)
    return times


def cached(engine: Engine, prompt: list[int], tokens: int, threshold: float) -> list[tuple[float, int, bool]]:
    """Greedy tokens through the decode graph: (seconds, depth, prefill) per token, timed around each step."""
    out = []
    steps = engine.generate_tokens(prompt, SamplingParams(max_tokens=tokens), threshold)
    while True:
        start = time.perf_counter()
        token = next(steps, None)
        if token is None:
            return out
        out.append((time.perf_counter() - start, token.depth, token.prefill))


def piece_ms(model, context: int, opset: int = 18) -> dict[str, float]:
    """One layer's full step (f) and key/value fill (k) at batch 1, one new token, ``context`` cached positions,
    each on ONNX Runtime without the fixed cost of a call (timed on an Identity graph)."""
    import onnx
    from onnx import TensorProto, helper

    from ponder.decode_graph import decode_pieces
    from ponder.graph import tensors_of

    pieces = decode_pieces(model, opset)
    cfg = model.cfg
    hd = cfg.d_model // cfg.n_heads
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(1, 1, cfg.d_model)).astype(np.float32)
    values = {"halted": np.zeros((1, 1), bool), "cum": np.zeros((1, 1), np.float32),
              "depth": np.zeros((1, 1), np.float32), "output": np.zeros_like(hidden), "hidden": hidden,
              "layers": np.array(0, np.int64), "cos": np.ones((1, 1, 1, hd), np.float32),
              "sin": np.zeros((1, 1, 1, hd), np.float32), "mask": np.ones((1, cfg.n_heads, 1, context + 1), bool),
              "act_threshold": np.ones((1, 1), np.float32), "layer": np.array(1, np.int64),
              "past_key": rng.normal(size=(1, cfg.n_heads, context, hd)).astype(np.float32),
              "past_value": rng.normal(size=(1, cfg.n_heads, context, hd)).astype(np.float32)}
    weights = {f"w{k}": t.detach().numpy() for k, (_, t) in enumerate(tensors_of(model.blocks[1]))}
    identity = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, cfg.d_model])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, cfg.d_model])]),
        opset_imports=[helper.make_opsetid("", opset)])
    identity.ir_version = 10
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for name, graph in (("step", pieces["step"]), ("fill", pieces["fill"]), ("identity", None)):
            proto = identity if graph is None else helper.make_model(graph, opset_imports=[
                helper.make_opsetid("", opset)])
            proto.ir_version = 10
            path = Path(tmp) / f"{name}.onnx"
            onnx.save(proto, str(path))
            sess = open_session(path, DECODE_THREADS, spinning=False)  # as the engine runs the decode graph
            names = [i.name for i in sess.get_inputs()]
            feed = {"x": hidden} if graph is None else {n: values.get(n, weights.get(n)) for n in names}
            runs[name] = (sess, feed)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(PIECE_REPEATS):
            for name, (sess, feed) in runs.items():
                start = time.perf_counter()
                sess.run(None, feed)
                times[name].append(time.perf_counter() - start)
        call = statistics.median(times["identity"]) * 1e3
        result = {"call_ms": call, "step_ms": statistics.median(times["step"]) * 1e3 - call,
                  "fill_ms": statistics.median(times["fill"]) * 1e3 - call}
    return result


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, q))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="runs/demo")
    parser.add_argument("--repeats", type=int, default=6, help="prompts per cell (different text each)")
    parser.add_argument("--tokens", type=int, default=8, help="tokens generated per prompt (default: 8)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[16, 64, 120])
    parser.add_argument("--out", default="benchmarks/results/generate.json")
    args = parser.parse_args(argv)
    ckpt = Path(args.checkpoint)
    if not (ckpt / "latest").exists() and not (ckpt / "config.json").exists():
        print(f"training the demo model into {ckpt}...", file=sys.stderr)
        Trainer(load_config(preset="demo"), ckpt).train()
    model, tokenizer, run = load_model(ckpt)
    n_layers, max_len = model.cfg.n_layers, model.cfg.max_seq_len
    if max(args.contexts) + args.tokens > max_len:
        parser.error(f"the longest context {max(args.contexts)} + --tokens {args.tokens} must fit the model's "
                     f"max_seq_len {max_len}")
    text = prepare_data(run.data, tokenizer).splits["valid"].tolist()
    cells, pieces = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        print("exporting the scoring and decode graphs...", file=sys.stderr)
        export_model(model, Path(tmp) / "model.onnx", metadata={"tokenizer": tokenizer.to_json()})
        engine = Engine(Path(tmp) / "model.onnx", threads=torch.get_num_threads(), spinning=False)
        folded = fold_norms(model)
        for context in args.contexts:
            print(f"context {context}: timing the pieces...", file=sys.stderr)
            pieces[context] = piece_ms(folded, context)
            prompts = [text[k * 211: k * 211 + context] for k in range(args.repeats)]
            per = {t: {"recompute": [], "cached": [], "prefill": [], "forward": [], "depths": []} for t in THRESHOLDS}
            floor = []
            for prompt in prompts[:1]:  # warm-up
                for t in THRESHOLDS:
                    recompute(engine, prompt, 2, t)
                    cached(engine, prompt, 2, t)
            for prompt in prompts:
                for t in [*THRESHOLDS, FLOOR]:  # the floor interleaved with the rest, as one more threshold
                    if t == FLOOR:
                        floor += [s for s, d, first in cached(engine, prompt, args.tokens, FLOOR)
                                  if not first and d == 1]
                        continue
                    per[t]["recompute"] += recompute(engine, prompt, args.tokens, t)
                    steps = cached(engine, prompt, args.tokens, t)
                    per[t]["cached"] += [s for s, _, first in steps if not first]
                    per[t]["depths"] += [d for _, d, first in steps if not first]
                    for _ in range(PREFILL_PAIRS):  # the prompt's prefill and one forward of it, alternating
                        start = time.perf_counter()
                        engine.decode_step(prompt, None, t)
                        per[t]["prefill"].append(time.perf_counter() - start)
                        start = time.perf_counter()
                        engine.infer(np.array([prompt], dtype=np.int64), t)
                        per[t]["forward"].append(time.perf_counter() - start)
            # medians throughout: this machine is shared, and a few slow steps would move a mean
            full = statistics.median(per[1.0]["cached"]) * 1e3  # T_L: every layer full
            one = statistics.median(floor) * 1e3  # T_1: layer 0 full, the others fill
            slope = (full - one) / (n_layers - 1)  # f - k
            for t in THRESHOLDS:
                p = per[t]
                step_ms = statistics.median(p["cached"]) * 1e3
                bound_ms = one + (statistics.mean(p["depths"]) - 1) * slope  # linear in depth: the mean's bound
                cell = {
                    "context": context, "threshold": t, "mean_token_depth": statistics.mean(p["depths"]),
                    "recompute_tokens_per_s": 1e3 / (statistics.median(p["recompute"]) * 1e3),
                    "cached_tokens_per_s": 1e3 / (statistics.median(p["cached"]) * 1e3),
                    "recompute_p50_ms": pct(p["recompute"], 50), "recompute_p99_ms": pct(p["recompute"], 99),
                    "cached_p50_ms": pct(p["cached"], 50), "cached_p99_ms": pct(p["cached"], 99),
                    "prefill_p50_ms": pct(p["prefill"], 50), "forward_p50_ms": pct(p["forward"], 50),
                    "speedup_over_full_depth": full / step_ms, "bound_speedup": full / bound_ms,
                    "depth1_step_ms": one, "full_depth_step_ms": full,
                }
                cell["cached_over_recompute"] = cell["cached_tokens_per_s"] / cell["recompute_tokens_per_s"]
                cell["prefill_over_forward"] = cell["prefill_p50_ms"] / cell["forward_p50_ms"]
                cell["share_of_bound"] = cell["speedup_over_full_depth"] / cell["bound_speedup"]
                cells.append(cell)
    goals = {"cached_over_recompute_at_full_depth_120": GOAL_CACHED_OVER_RECOMPUTE,
             "share_of_bound": GOAL_BOUND_SHARE, "prefill_over_forward": 1.0}
    report = {"ponder_version": __version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.machine(), "n_layers": n_layers, "max_seq_len": max_len, "tokens": args.tokens,
              "repeats": args.repeats, "pieces_ms": {str(c): v for c, v in pieces.items()}, "goals": goals,
              "cells": cells}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'ctx':>4} {'thr':>5} {'depth':>5} {'recomp tok/s':>12} {'cached tok/s':>12} {'x':>6} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'prefill':>7} {'forward':>7} {'speed-up':>8} {'bound':>6} {'share':>6}")
    for c in cells:
        print(f"{c['context']:>4} {c['threshold']:>5g} {c['mean_token_depth']:>5.2f} "
              f"{c['recompute_tokens_per_s']:>12.0f} {c['cached_tokens_per_s']:>12.0f} "
              f"{c['cached_over_recompute']:>6.1f} {c['cached_p50_ms']:>7.3f} {c['cached_p99_ms']:>7.3f} "
              f"{c['prefill_p50_ms']:>7.2f} {c['forward_p50_ms']:>7.2f} {c['speedup_over_full_depth']:>8.2f} "
              f"{c['bound_speedup']:>6.2f} {c['share_of_bound']:>6.2f}")
    for context, p in pieces.items():
        cell = next(c for c in cells if c["context"] == context)
        print(f"context {context}: a step at depth 1 {cell['depth1_step_ms']:.3f} ms, at full depth "
              f"{cell['full_depth_step_ms']:.3f} ms; on its own, one layer's full step {p['step_ms']:.3f} ms and its "
              f"key/value fill {p['fill_ms']:.3f} ms (ONNX Runtime's cost per call, {p['call_ms']:.3f} ms, taken off)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
