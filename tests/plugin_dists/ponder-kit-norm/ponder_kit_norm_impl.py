import torch
from torch import nn

from ponder.contracts.norms import ChannelsFirst


class Softsign(nn.Module):
    """``s x / (1 + |s x|)``: what is left of the norm once its affine is folded away."""

    def __init__(self, scale):
        super().__init__()
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, x):
        y = self.scale * x
        return y / (1 + y.abs())


class SoftsignNorm(nn.Module):
    """``weight * softsign(scale * x) + bias``: a FoldableNorm that needs the ``event-counter`` controller."""

    training_controller = "event-counter"  # NeedsController: the trainer adds it by itself

    def __init__(self, num_features, scale=1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x):
        y = self.scale * x
        return self.weight * (y / (1 + y.abs())) + self.bias

    def split_affine(self):  # FoldableNorm
        return Softsign(float(self.scale.detach())), self.weight, self.bias

    def metrics(self):
        return {"scale": float(self.scale.detach())}


def softsign_norm(num_features, position="attn", scale=1.0):
    """weight * softsign(scale * x) + bias, no statistics.

    Args:
        num_features: size of the feature dimension (supplied by ponder).
        position: where the norm sits: attn, ffn, final, or conv for channels-first features.
        scale: initial value of the learnable input scale.
    """
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    norm = SoftsignNorm(num_features, scale)
    return ChannelsFirst(norm) if position == "conv" else norm
