import torch
from torch import nn


class ScaleNorm(nn.Module):
    """g * x / ||x|| with one learned scale.

    Args:
        num_features: feature size.
        position: where the norm sits.
        eps: floor on the norm.
    """

    def __init__(self, num_features, position="attn", eps=1e-5):
        super().__init__()
        self.g = nn.Parameter(torch.tensor(float(num_features) ** 0.5))
        self.eps = eps

    def forward(self, x):
        return self.g * x / x.norm(dim=-1, keepdim=True).clamp_min(self.eps)
