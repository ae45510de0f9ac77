"""Norm layers side by side: LayerNorm, RMSNorm, DyT and ADyT.

    python benchmarks/bench_norms.py [--repeats 200] [--out benchmarks/results/norms.json]

For x of shape [8, 128, d], d in {128, 512}: forward+backward time in torch (eager, CPU) and
inference time in ONNX Runtime (each norm exported alone with torch.onnx.export), as medians of
interleaved repeats, with ratios to LayerNorm measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from ponder import __version__, registry

NORMS = ["layernorm", "rmsnorm", "dyt", "adyt"]


def time_interleaved(fns: dict[str, callable], repeats: int, warmup: int = 10) -> dict[str, float]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def torch_fwd_bwd(module: torch.nn.Module, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    grad = torch.randn_like(x)

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(grad)

    return step


def onnx_session(module: torch.nn.Module, x: torch.Tensor, folder: Path, name: str):
    from ponder.onnx_runtime import open_session

    path = folder / f"{name}.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (x,), str(path), input_names=["x"], output_names=["y"], dynamo=True)
    session = open_session(path, torch.get_num_threads())
    feed = {"x": x.numpy()}
    expected = module(x).detach().numpy()
    got = session.run(None, feed)[0]
    assert abs(got - expected).max() < 1e-4, f"{name}: ONNX output differs from torch"
    return lambda: session.run(None, feed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--out", default="benchmarks/results/norms.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for d in args.dims:
            x = torch.randn(8, 128, d)
            modules = {n: registry.create("norm", n, d) for n in NORMS}
            train = time_interleaved({n: torch_fwd_bwd(m.train(), x) for n, m in modules.items()}, args.repeats)
            infer = time_interleaved({n: onnx_session(m, x, Path(tmp), f"{n}{d}") for n, m in modules.items()},
                                     args.repeats)
            for n in NORMS:
                rows.append({"norm": n, "d": d, "shape": [8, 128, d],
                             "torch_fwd_bwd_ms": train[n] * 1e3,
                             "torch_ratio_to_layernorm": train[n] / train["layernorm"],
                             "onnx_infer_ms": infer[n] * 1e3,
                             "onnx_ratio_to_layernorm": infer[n] / infer["layernorm"]})
    report = {"ponder_version": __version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.machine(), "repeats": args.repeats, "results": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'norm':<10} {'d':>4} {'torch fwd+bwd ms':>16} {'vs LN':>6} {'ORT infer ms':>12} {'vs LN':>6}")
    for r in rows:
        print(f"{r['norm']:<10} {r['d']:>4} {r['torch_fwd_bwd_ms']:>16.3f} {r['torch_ratio_to_layernorm']:>6.2f} "
              f"{r['onnx_infer_ms']:>12.3f} {r['onnx_ratio_to_layernorm']:>6.2f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
