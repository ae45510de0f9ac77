"""DyT in place of BatchNorm, at CPU scale: a small CNN with BatchNorm against the same CNN with DyT.

    python examples/digits_dyt.py [--epochs 20] [--out examples/output]

Data: scikit-learn's bundled 8x8 digit images (1,797 of them, no download), a fixed 80/20 split.
The DyT model is the BatchNorm model passed through ``ponder.convert(..., to="dyt",
source="batchnorm", alpha_init_value=1.0)``: earlier experiments found that the paper's alpha 0.5 did not work
when replacing BatchNorm, and the DyT paper reports that replacing BatchNorm costs accuracy
(ResNet-50 on ImageNet: 76.2 -> 68.9). Writes ``digits_dyt.png`` (test accuracy per epoch side by
side with each DyT layer's alpha) and ``digits_dyt.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

import ponder
from ponder.plugins.norm import DynamicTanh


def load_digits_tensors(seed: int = 0):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("this example needs scikit-learn: pip install 'ponder[examples]'") from None
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def make_cnn() -> nn.Module:
    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(*block(1, 16), *block(16, 32), nn.MaxPool2d(2), *block(32, 32),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def train(model: nn.Module, data, epochs: int, seed: int, lr: float = 3e-3, batch: int = 64) -> dict:
    (xtr, ytr), (xte, yte) = data
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history = {"epoch": [], "test_accuracy": [], "train_loss": [], "alpha": {}}
    dyt_layers = {name: m for name, m in model.named_modules() if isinstance(m, DynamicTanh)}
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(ytr), generator=gen)
        total = 0.0
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss) * len(idx)
        model.eval()
        with torch.no_grad():
            accuracy = float((model(xte).argmax(1) == yte).float().mean())
        history["epoch"].append(epoch)
        history["test_accuracy"].append(accuracy)
        history["train_loss"].append(total / len(ytr))
        for name, layer in dyt_layers.items():
            history["alpha"].setdefault(name, []).append(float(layer.alpha))
        print(f"  epoch {epoch:>3}: train loss {total / len(ytr):.4f}, test accuracy {accuracy:.3f}")
    return history


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, h in results.items():
        left.plot(h["epoch"], h["test_accuracy"], "o-", ms=3, label=label)
    left.set_xlabel("epoch")
    left.set_ylabel("test accuracy")
    left.set_title("Digits: BatchNorm vs DyT (alpha init 1.0)")
    left.legend()
    for name, alphas in results["DyT"]["alpha"].items():
        right.plot(results["DyT"]["epoch"], alphas, label=f"DyT at Sequential[{name}]")
    right.set_xlabel("epoch")
    right.set_ylabel("alpha")
    right.set_title("DyT alpha per layer")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="BatchNorm vs DyT on scikit-learn's digits")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="examples/output", help="folder for digits_dyt.png and .json")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    data = load_digits_tensors(args.seed)
    results = {}
    for label in ("BatchNorm", "DyT"):
        torch.manual_seed(args.seed)
        model = make_cnn()
        if label == "DyT":
            replaced = ponder.convert(model, to="dyt", source="batchnorm", alpha_init_value=1.0)
            print(f"DyT: replaced {replaced} BatchNorm layers")
        print(f"training the {label} CNN for {args.epochs} epochs")
        results[label] = train(model, data, args.epochs, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "digits_dyt.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "digits_dyt.png")
    for label, h in results.items():
        print(f"{label}: final test accuracy {h['test_accuracy'][-1]:.3f} (best {max(h['test_accuracy']):.3f})")
    print(f"wrote {out / 'digits_dyt.png'} and {out / 'digits_dyt.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
