"""Loss curves of DAG against torch's AdamW: a badly conditioned quadratic, and the demo model.

    python benchmarks/dag_curves.py [--steps 150] [--quad-steps 500] [--out docs/dag_curves.png]

Left panel: ``0.5 * sum(h_i * x_i**2)`` with ``h`` log-spaced over ``--condition`` (1e3), from ``x = 1``; each
optimizer runs at every learning rate of a small grid and the best (lowest final loss) is drawn, the rest faintly.
Right panel: the demo preset (ponder/presets/demo.toml) trained for ``--steps`` steps with each optimizer, same
seed, data and schedule (the trainer's warm-up and gradient clipping); training loss (per log interval) and
validation loss. DAG's settings for the demo are ``--dag-lr``/``--dag-momentum``; AdamW keeps the preset's.
Takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from ponder.config import PluginSpec, load_config
from ponder.plugins.optim.dag import DAG
from ponder.train import Trainer

QUAD_LRS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]


def quadratic(name: str, lr: float, steps: int, dim: int, condition: float) -> list[float]:
    h = torch.logspace(0, math.log10(condition), dim, dtype=torch.float64).float()
    x = torch.nn.Parameter(torch.ones(dim))
    if name == "dag":
        opt: torch.optim.Optimizer = DAG([x], lr=lr, shrink={"warmup_steps": 50})
    else:
        opt = torch.optim.AdamW([x], lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.5 * (h * x * x).sum()
        losses.append(loss.item())
        loss.backward()
        opt.step()
    losses.append((0.5 * (h * x * x).sum()).item())
    return losses


def demo(spec: PluginSpec, steps: int, folder: Path) -> dict:
    run = load_config(preset="demo")
    run = dataclasses.replace(run, optimizer=spec,
                              train=dataclasses.replace(run.train, eval_every=25, log_every=10))
    start = time.perf_counter()
    trainer = Trainer(run, folder, progress=False, steps=steps)
    initial = trainer.validate()["loss"]
    final = trainer.train()
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in records if r["split"] == "train"]
    valid = [(0, initial)] + [(r["step"], r["loss"]) for r in records if r["split"] == "valid"]
    last = next((r.get("optimizer") for r in reversed(records) if r["split"] == "train"), None)
    return {"train": train, "valid": valid, "final_valid_loss": final["loss"], "seconds": time.perf_counter() - start,
            "optimizer_metrics": last}


def plot(quad: dict, runs: dict, path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = {"dag": "tab:red", "adamw": "tab:blue"}
    for name, by_lr in quad.items():
        best = min(by_lr, key=lambda lr: by_lr[lr][-1])
        for lr, losses in by_lr.items():
            if lr != best:
                left.plot(losses, color=colors[name], alpha=0.15, lw=0.8)
        left.plot(by_lr[best], color=colors[name], lw=1.8,
                  label=f"{name.upper() if name == 'dag' else 'AdamW'} lr {best:g}: {by_lr[best][-1]:.3g}")
    left.set_yscale("log")
    left.set_xlabel("step")
    left.set_ylabel("loss")
    left.set_title(f"Quadratic, {args.dim} dims, condition {args.condition:g} (faint: other lrs)")
    left.legend(fontsize=8)
    for name, r in runs.items():
        label = "DAG" if name == "dag" else "AdamW"
        steps, losses = zip(*r["train"], strict=True)
        right.plot(steps, losses, color=colors[name], lw=1.0, alpha=0.6, label=f"{label} train")
        steps, losses = zip(*r["valid"], strict=True)
        right.plot(steps, losses, "o-", color=colors[name], lw=1.8, ms=3,
                   label=f"{label} valid (final {r['final_valid_loss']:.3f})")
    right.set_xlabel("step")
    right.set_ylabel("loss (cross-entropy + ponder cost)")
    right.set_title(f"Demo model, {args.steps} steps ({args.dag_spec})")
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="demo-model training steps per optimizer")
    parser.add_argument("--quad-steps", type=int, default=500, help="steps on the quadratic")
    parser.add_argument("--dim", type=int, default=100, help="dimensions of the quadratic")
    parser.add_argument("--condition", type=float, default=1e3, help="condition number of the quadratic")
    parser.add_argument("--dag-lr", type=float, default=3e-3, help="DAG's learning rate on the demo model")
    parser.add_argument("--dag-momentum", type=float, default=0.0, help="DAG's momentum on the demo model")
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "docs" / "dag_curves.png")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    quad = {name: {lr: quadratic(name, lr, args.quad_steps, args.dim, args.condition) for lr in QUAD_LRS}
            for name in ("dag", "adamw")}
    print(f"quadratic ({args.dim} dims, condition {args.condition:g}, {args.quad_steps} steps), "
          f"start {quad['dag'][QUAD_LRS[0]][0]:.4g}:")
    for name, by_lr in quad.items():
        print(f"  {name:<6} " + "  ".join(f"lr {lr:g}: {losses[-1]:.3g}" for lr, losses in by_lr.items()))

    dag_params = {"lr": args.dag_lr, "momentum": args.dag_momentum}
    args.dag_spec = "DAG " + ", ".join(f"{k} {v:g}" for k, v in dag_params.items())
    preset = load_config(preset="demo").optimizer
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in (("dag", PluginSpec("dag", dag_params)), ("adamw", preset)):
            runs[name] = demo(spec, args.steps, Path(tmp) / name)
            r = runs[name]
            print(f"demo model, {name:<6} {spec.to_json()}: valid loss {r['valid'][0][1]:.3f} -> "
                  f"{r['final_valid_loss']:.3f}, last train loss {r['train'][-1][1]:.3f} "
                  f"({r['seconds']:.0f} s)" + (f", dials {r['optimizer_metrics']}" if r["optimizer_metrics"] else ""))
    plot(quad, runs, args.out, args)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
