"""Benchmark of the demo model: training tokens/s, and eval latency per threshold.

    python benchmarks/bench_train_eval.py [--checkpoint RUN] [--out benchmarks/results/train_eval.json]

Training throughput: median seconds per step over ``--steps`` steps of the demo preset (after a
warm-up), as tokens/s. Eval latency: median of ``--repeats`` forward passes per threshold and batch
size on a trained demo model (``--checkpoint``, default runs/demo; trained here for
``--train-steps`` steps if missing), with layers executed and the speed-up against threshold 1.0,
measured side by side in one run.
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

import torch

from ponder import __version__
from ponder.checkpoint import load_model
from ponder.config import load_config
from ponder.data import TokenChunks, prepare_data
from ponder.train import Trainer

THRESHOLDS = [0.5, 0.8, 0.9, 0.95, 0.99, 1.0]


def bench_training(steps: int, warmup: int) -> dict:
    run = load_config(preset="demo")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(run, tmp, progress=False)
        model, opt = trainer.model, trainer.optimizer
        times = []
        for step in range(warmup + steps):
            x, y = trainer._batch(step)
            start = time.perf_counter()
            out = model(x, y)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step >= warmup:
                times.append(time.perf_counter() - start)
    tokens = run.train.batch_size * run.train.seq_len
    median = statistics.median(times)
    return {"steps": steps, "tokens_per_step": tokens, "median_step_s": median, "tokens_per_s": tokens / median,
            "p90_step_s": statistics.quantiles(times, n=10)[-1]}


@torch.no_grad()
def bench_eval(checkpoint: Path, repeats: int, batch_sizes: list[int]) -> list[dict]:
    model, tokenizer, run = load_model(checkpoint)
    chunks = TokenChunks(prepare_data(run.data, tokenizer).splits["valid"], run.train.seq_len)
    rows = []
    for batch in batch_sizes:
        x, _ = chunks.batch(torch.arange(batch))
        per_threshold = {}
        for _ in range(3):  # warm-up of every threshold
            for t in THRESHOLDS:
                model(x, threshold=t)
        for t in THRESHOLDS:
            per_threshold[t] = []
        for _ in range(repeats):  # interleaved, so drift hits every threshold alike
            for t in THRESHOLDS:
                start = time.perf_counter()
                out = model(x, threshold=t)
                per_threshold[t].append((time.perf_counter() - start, out.layers_executed, float(out.depth.mean())))
        full = statistics.median(s for s, _, _ in per_threshold[1.0])
        for t in THRESHOLDS:
            samples = per_threshold[t]
            median = statistics.median(s for s, _, _ in samples)
            layers = statistics.mean(n for _, n, _ in samples)
            rows.append({"batch_size": batch, "seq_len": run.train.seq_len, "threshold": t,
                         "median_ms": median * 1e3, "layers_executed": layers,
                         "mean_token_depth": statistics.mean(d for _, _, d in samples),
                         "speedup_vs_full": full / median, "ideal_speedup": model.cfg.n_layers / layers})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="runs/demo", help="a trained demo run (default: runs/demo)")
    parser.add_argument("--train-steps", type=int, default=600, help="steps to train the demo model if missing")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps")
    parser.add_argument("--repeats", type=int, default=30, help="timed forward passes per threshold")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--out", default="benchmarks/results/train_eval.json")
    args = parser.parse_args(argv)

    ckpt = Path(args.checkpoint)
    if not (ckpt / "latest").exists() and not (ckpt / "config.json").exists():
        print(f"training the demo model into {ckpt} ({args.train_steps} steps)...", file=sys.stderr)
        Trainer(load_config(preset="demo"), ckpt, steps=args.train_steps).train()
    print("timing training steps...", file=sys.stderr)
    training = bench_training(args.steps, warmup=5)
    print("timing eval per threshold...", file=sys.stderr)
    evaluation = bench_eval(ckpt, args.repeats, args.batch_sizes)
    report = {"ponder_version": __version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.machine(), "python": platform.python_version(),
              "training": training, "eval": evaluation}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"training: {training['tokens_per_s']:,.0f} tokens/s (median step {training['median_step_s'] * 1e3:.1f} ms)")
    print(f"{'batch':>5} {'threshold':>9} {'median ms':>9} {'layers':>6} {'depth':>5} {'speed-up':>8} {'ideal':>5}")
    for r in evaluation:
        print(f"{r['batch_size']:>5} {r['threshold']:>9g} {r['median_ms']:>9.2f} {r['layers_executed']:>6.2f} "
              f"{r['mean_token_depth']:>5.2f} {r['speedup_vs_full']:>8.2f} {r['ideal_speedup']:>5.2f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
