"""Analysis of a run: what norm layers do to their inputs, how DyT alphas and the dials move in training.

``analyze_norms`` hooks every norm layer of a model, runs a batch, and plots each layer's output
(its per-channel affine removed) against its input: the S-curves the DyT paper reports for
LayerNorm. Each layer gets a fitted ``c * tanh(alpha * x)`` and, for comparison, a straight line.
``analyze_alphas`` plots the alpha of every DyT/ADyT layer over a run, from ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ponder.contracts.norms import ChannelsFirst, FoldableNorm
from ponder.errors import PonderError

POINTS_PER_LAYER = 4000


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The norm layers of any model: LayerNorm, BatchNorm, GroupNorm, any RMSNorm, and every norm that declares
    itself foldable (DyT/ADyT and third-party ones); wrappers are counted once."""
    types: tuple[type, ...] = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, FoldableNorm)
    if hasattr(nn, "RMSNorm"):
        types += (nn.RMSNorm,)
    out, inner = [], set()
    for name, module in model.named_modules():
        if id(module) in inner:
            continue
        if isinstance(module, ChannelsFirst):
            inner.add(id(module.norm))
            out.append((name, module))
        elif isinstance(module, types) or type(module).__name__.endswith("RMSNorm"):
            out.append((name, module))
    return out


def _core(module: nn.Module, y: Tensor) -> Tensor:
    """The layer's output with its per-channel affine (weight, bias) taken off."""
    layer = module.norm if isinstance(module, ChannelsFirst) else module
    weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
    if not isinstance(weight, Tensor) or weight.dim() != 1:
        return y
    channels_first = (isinstance(module, (ChannelsFirst, nn.modules.batchnorm._BatchNorm, nn.GroupNorm))
                      or getattr(layer, "channels_last", True) is False)
    shape = (-1,) + (1,) * (y.dim() - 2) if channels_first else (weight.shape[0],)
    if isinstance(bias, Tensor):
        y = y - bias.view(shape)
    w = weight.view(shape)
    return torch.where(w.abs() > 1e-6, y / torch.where(w.abs() > 1e-6, w, torch.ones_like(w)), y)


def fit_tanh(x: Tensor, y: Tensor) -> dict[str, float]:
    """Least squares ``y ~ c * tanh(alpha * x)`` over a log grid of alpha (c in closed form), and a line."""
    x, y = x.double(), y.double()
    total = float(((y - y.mean()) ** 2).sum()) or 1.0
    best = (math.inf, 1.0, 1.0)
    for alpha in torch.logspace(-3, 2, 300, dtype=torch.float64).tolist():
        t = torch.tanh(alpha * x)
        c = float((t * y).sum() / (t * t).sum().clamp_min(1e-12))
        sse = float(((y - c * t) ** 2).sum())
        if sse < best[0]:
            best = (sse, alpha, c)
    design = torch.stack([x, torch.ones_like(x)], dim=1)
    coef = torch.linalg.lstsq(design, y[:, None]).solution[:, 0]
    linear_sse = float(((design @ coef - y) ** 2).sum())
    return {"alpha": best[1], "scale": best[2], "r2_tanh": 1 - best[0] / total, "r2_linear": 1 - linear_sse / total}


@torch.no_grad()
def collect_norm_io(model: nn.Module, run_batch: Any, points: int = POINTS_PER_LAYER,
                    seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """Hook every norm layer, call ``run_batch()``, return ``{layer: (inputs, outputs)}`` (subsampled)."""
    layers = norm_layers(model)
    if not layers:
        raise PonderError("the model has no norm layers (LayerNorm, BatchNorm, RMSNorm, DyT, ADyT) to analyse")
    gen = torch.Generator().manual_seed(seed)
    seen: dict[str, tuple[Tensor, Tensor]] = {}

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if name in seen:  # a layer used twice (e.g. in a layer loop): the first call is enough
                return
            x = inputs[0].detach().float().flatten().cpu()
            y = _core(module, output.detach().float()).flatten().cpu()
            pick = torch.randperm(x.numel(), generator=gen)[:points]
            seen[name] = (x[pick], y[pick])
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in layers]
    try:
        run_batch()
    finally:
        for h in handles:
            h.remove()
    return {name: seen[name] for name, _ in layers if name in seen}


def analyze_norms(model: nn.Module, run_batch: Any, out_dir: str | Path, title: str = "") -> dict[str, Any]:
    """S-curves of every norm layer: ``norm_curves.png`` and ``norm_curves.json`` in ``out_dir``."""
    from ponder.plots import plot_norm_curves

    was_training = model.training
    model.eval()
    try:
        io = collect_norm_io(model, run_batch)
    finally:
        model.train(was_training)
    layers = [{"layer": name, "points": int(x.numel()), **fit_tanh(x, y)} for name, (x, y) in io.items()]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"layers": layers}
    (out / "norm_curves.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_norm_curves(io, layers, out / "norm_curves.png", title=title)
    return report


def analyze_checkpoint_norms(path: str | Path, out_dir: str | Path | None = None) -> tuple[dict[str, Any], Path]:
    """``analyze_norms`` on a ponder checkpoint, over one validation batch of its own data."""
    from ponder.checkpoint import load_model, resolve, run_folder
    from ponder.data import TokenChunks, prepare_data
    from ponder.plots import run_label

    ckpt = resolve(path)
    model, tokenizer, run = load_model(ckpt)
    chunks = TokenChunks(prepare_data(run.data, tokenizer).splits["valid"], run.train.seq_len)
    x, _ = chunks.batch(torch.arange(min(run.train.batch_size, len(chunks))))
    out = Path(out_dir) if out_dir else run_folder(ckpt)
    title = f"{run_label(ckpt)}: norm input vs output"
    return analyze_norms(model, lambda: model(x, threshold=1.0), out, title=title), out


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` (a line cut short by a kill is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PonderError(f"{str(path)!r} does not exist: give the folder of a training run")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def analyze_dials(run_dir: str | Path, out_dir: str | Path | None = None) -> tuple[dict[str, Any], Path]:
    """Each dial and the loss over a run: ``dials.png`` and ``dials.json``."""
    from ponder.plots import plot_dials

    records = read_metrics(run_dir)
    train = [r for r in records if r.get("split") == "train" and "dials" in r]
    if not train:
        raise PonderError(f"{str(Path(run_dir) / 'metrics.jsonl')!r} has no training records yet")
    valid = [r for r in records if r.get("split") == "valid"]
    names = list(train[0]["dials"])
    series = {
        "step": [r["step"] for r in train],
        "loss": [r["loss"] for r in train],
        "valid_step": [r["step"] for r in valid],
        "valid_loss": [r["loss"] for r in valid],
        "dials": {n: [r["dials"][n] for r in train] for n in names},
    }
    out = Path(out_dir) if out_dir else Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"dials": [{"dial": n, "first": v[0], "last": v[-1], "min": min(v), "max": max(v)}
                        for n, v in series["dials"].items()]}
    (out / "dials.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_dials({Path(run_dir).resolve().name: series}, out / "dials.png")
    return report, out


def read_alphas(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Per DyT/ADyT layer, ``[(step, alpha), ...]`` from a run's ``metrics.jsonl``."""
    series: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(run_dir):
        for layer, values in record.get("norms", {}).items():
            if "alpha" in values:
                series.setdefault(layer, []).append((record["step"], values["alpha"]))
    if not series:
        raise PonderError(f"{str(Path(run_dir) / 'metrics.jsonl')!r} has no alpha records: the run's norm is not "
                          "DyT or ADyT")
    return series


def analyze_alphas(run_dir: str | Path, out_dir: str | Path | None = None) -> tuple[dict[str, Any], Path]:
    """Alpha trajectories of a run: ``alphas.png`` and ``alphas.json``."""
    from ponder.plots import plot_alphas

    series = read_alphas(run_dir)
    out = Path(out_dir) if out_dir else Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"layers": [{"layer": k, "first": v[0][1], "last": v[-1][1], "min": min(a for _, a in v),
                          "max": max(a for _, a in v), "records": len(v)} for k, v in series.items()]}
    (out / "alphas.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_alphas(series, out / "alphas.png", title=f"DyT alpha over training: {Path(run_dir).resolve().name}")
    return report, out
