"""Optimizer step time of DAG against torch's AdamW on the demo model's parameters.

    python benchmarks/bench_dag.py [--steps 50] [--warmup 5] [--device cpu] [--threads N] [--out FILE]
                                   [--model d_model=1024 n_layers=12 ...]

Each optimizer gets its own copy of the demo model's parameters, with the same random gradients set once.
Steps are timed interleaved (each round times every optimizer once, in a rotating order), and the median
over ``--steps`` rounds after ``--warmup`` rounds is reported, with the ratio to AdamW (foreach).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ponder import __version__
from ponder.config import load_config
from ponder.plugins.optim.dag import DAG
from ponder.train import build_model

# name -> factory(params); the quick-start settings are the seed's (momentum, weight decay, k 1.5)
OPTIMIZERS: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "adamw (foreach)": lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.01, foreach=True),
    "dag (foreach, defaults)": lambda ps: DAG(ps, lr=3e-3, foreach=True),
    "dag (foreach, quick start)": lambda ps: DAG(ps, lr=3e-4, weight_decay=1e-2, momentum=0.9, k_val=1.5,
                                                 lambda_rms=0.3, s_min=0.1, foreach=True),
    "dag (loop, defaults)": lambda ps: DAG(ps, lr=3e-3, foreach=False),
}
BASELINE = "adamw (foreach)"


def bench(steps: int, warmup: int, device: str, model_overrides: dict | None = None) -> dict:
    torch.manual_seed(0)
    run = load_config(preset="demo")
    if model_overrides:
        run = dataclasses.replace(run, model=dataclasses.replace(run.model, **model_overrides))
    model = build_model(run, 256).to(device)
    base = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.randn_like(p) for p in base]
    runs = {}
    for name, make in OPTIMIZERS.items():
        params = [torch.nn.Parameter(copy.deepcopy(p.detach())) for p in base]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        runs[name] = (make(params), [])
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    names = list(runs)
    for i in range(warmup + steps):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            opt, times = runs[name]
            sync()
            start = time.perf_counter()
            opt.step()
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    base_median = statistics.median(runs[BASELINE][1])
    rows = []
    for name, (_, times) in runs.items():
        median = statistics.median(times)
        rows.append({"optimizer": name, "median_step_ms": median * 1e3,
                     "p90_step_ms": statistics.quantiles(times, n=10)[-1] * 1e3,
                     "ratio_to_adamw": median / base_median})
    return {"parameters": sum(p.numel() for p in base), "tensors": len(base), "steps": steps, "warmup": warmup,
            "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="timed rounds (each times every optimizer once)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override the demo model's settings, e.g. d_model=1024 n_layers=12 d_ff=4096")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dag.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k: int(v) for k, v in (item.split("=", 1) for item in args.model)}
    result = bench(args.steps, args.warmup, args.device, overrides)
    result["model_overrides"] = overrides
    result.update({
        "benchmark": "dag_step_time", "ponder_version": __version__, "torch": torch.__version__,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(args.device),
        "threads": torch.get_num_threads(), "python": platform.python_version(), "platform": platform.platform(),
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    label = f"demo model {overrides}" if overrides else "demo model"
    print(f"{label}: {result['parameters']:,} parameters in {result['tensors']} tensors, {result['device']}, "
          f"{result['threads']} threads, median of {args.steps} interleaved steps")
    print(f"{'optimizer':<28} {'median ms':>10} {'p90 ms':>8} {'/ adamw':>8}")
    for row in result["rows"]:
        print(f"{row['optimizer']:<28} {row['median_step_ms']:>10.3f} {row['p90_step_ms']:>8.3f} "
              f"{row['ratio_to_adamw']:>8.2f}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
