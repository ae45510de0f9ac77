"""Measuring a model: perplexity, layers executed and token depth, per threshold."""

from __future__ import annotations

import math
from typing import Any

import torch

from ponder.data import TokenChunks, prepare_data
from ponder.errors import DataError
from ponder.model import PonderLM


@torch.no_grad()
def evaluate(model: PonderLM, chunks: TokenChunks, *, batch_size: int, max_batches: int | None = None,
             threshold: float | None = None) -> dict[str, Any]:
    """Evaluate on the first ``max_batches`` batches of ``chunks`` in order (all of them if None).

    ``layers_executed`` is the mean over batches of the layers each batch actually ran (its
    deepest token); ``mean_token_depth`` the mean layers per token; both are layer counts in
    ``[1, n_layers]``. ``depth_histogram[k]`` counts tokens that ran ``k + 1`` layers.
    """
    was_training = model.training
    model.eval()
    n_layers = model.cfg.n_layers
    n_batches = math.ceil(len(chunks) / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    if n_batches < 1:
        raise DataError(f"nothing to evaluate: {len(chunks)} sequences, at most {max_batches} batches")
    ce_sum = depth_sum = 0.0
    tokens = layers_sum = 0
    hist = torch.zeros(n_layers, dtype=torch.long)
    device = next(model.parameters()).device
    for b in range(n_batches):
        idx = torch.arange(b * batch_size, min((b + 1) * batch_size, len(chunks)))
        x, y = chunks.batch(idx)
        out = model(x.to(device), y.to(device), threshold=threshold)
        ce_sum += out.ce.item() * y.numel()
        tokens += y.numel()
        layers_sum += out.layers_executed
        depth_sum += float(out.depth.sum())
        hist += torch.bincount(out.depth.long().flatten() - 1, minlength=n_layers).cpu()
    model.train(was_training)
    loss = ce_sum / tokens
    return {
        "threshold": model.dials.value("act_threshold") if threshold is None else threshold,
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "layers_executed": layers_sum / n_batches,
        "mean_token_depth": depth_sum / tokens,
        "n_layers": n_layers,
        "depth_histogram": hist.tolist(),
        "batches": n_batches,
        "batch_size": batch_size,
        "tokens": tokens,
    }


def evaluate_checkpoint(path: str, thresholds: list[float] | None = None, *, split: str = "valid",
                        max_batches: int | None = None, batch_size: int | None = None) -> list[dict[str, Any]]:
    """Evaluate a checkpoint at each threshold (default: the trained one) on a split of its own data,
    in batches of ``batch_size`` sequences (default: the training batch size)."""
    from ponder.checkpoint import load_model

    model, tokenizer, run = load_model(path)
    for t in thresholds or []:
        model.dials["act_threshold"].check(t)
    chunks = TokenChunks(prepare_data(run.data, tokenizer).splits[split], run.train.seq_len)
    batch_size = batch_size or run.train.batch_size
    return [evaluate(model, chunks, batch_size=batch_size, max_batches=max_batches, threshold=t)
            for t in (thresholds or [None])]
