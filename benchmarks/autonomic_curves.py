"""The demo preset with the ``autonomic`` controller on and off: loss and dials in one PNG.

    python benchmarks/autonomic_curves.py [--steps 600] [--device auto] [--out docs/autonomic.png]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from ponder.analyze import read_metrics
from ponder.config import PluginSpec, load_config
from ponder.plots import plot_dials
from ponder.train import Trainer


def run(label: str, autonomic: bool, steps: int, device: str, folder: Path) -> dict:
    cfg = load_config(preset="demo")
    cfg.train.log_every = 10
    if autonomic:
        cfg.controllers = [PluginSpec("autonomic", {"log_every": 0})]
    final = Trainer(cfg, folder / label, steps=steps, device=device, progress=False).train()
    records = read_metrics(folder / label)
    train = [r for r in records if r["split"] == "train"]
    valid = [r for r in records if r["split"] == "valid"]
    return {"final": final, "series": {
        "step": [r["step"] for r in train], "loss": [r["loss"] for r in train],
        "valid_step": [r["step"] for r in valid], "valid_loss": [r["loss"] for r in valid],
        "dials": {n: [r["dials"][n] for r in train] for n in ("rope_base", "attn_window")}}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="docs/autonomic.png")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = {label: run(label, on, args.steps, args.device, Path(tmp))
                   for label, on in (("autonomic off", False), ("autonomic on", True))}
    out = Path(args.out)
    plot_dials({k: v["series"] for k, v in results.items()}, out,
               title=f"demo preset, {args.steps} steps: loss and dials with autonomic on and off")
    summary = {k: {"valid_loss": v["final"]["loss"], "valid_perplexity": v["final"]["perplexity"],
                   "rope_base_last": v["series"]["dials"]["rope_base"][-1],
                   "attn_window_last": v["series"]["dials"]["attn_window"][-1]} for k, v in results.items()}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
