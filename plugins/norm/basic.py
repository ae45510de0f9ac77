"""LayerNorm and RMSNorm, as norm plugin factories that know their position."""

from __future__ import annotations

import torch
from torch import nn

from ponder.contracts.norms import ChannelsFirst

__all__ = ["ChannelsFirst", "RMSNorm", "layer_norm", "rms_norm"]


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x**2) + eps) * weight`` over the last dimension (pure tensor ops, exports to ONNX)."""

    def __init__(self, num_features: int, eps: float = 1e-6, elementwise_affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.normalized_shape = (num_features,)
        self.weight = nn.Parameter(torch.ones(num_features)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return y * self.weight if self.weight is not None else y

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def _place(norm: nn.Module, position: str) -> nn.Module:
    return ChannelsFirst(norm) if position == "conv" else norm


def layer_norm(num_features: int, position: str = "attn", eps: float = 1e-5,
               elementwise_affine: bool = True, bias: bool = True) -> nn.Module:
    """Layer normalisation over the feature dimension (``torch.nn.LayerNorm``).

    Args:
        num_features: size of the feature dimension (supplied by ponder).
        position: where the norm sits: attn, ffn, final, or conv for channels-first features.
        eps: added to the variance for numerical stability.
        elementwise_affine: learn a per-feature scale (and a shift if ``bias``).
        bias: learn a per-feature shift.
    """
    return _place(nn.LayerNorm(num_features, eps=eps, elementwise_affine=elementwise_affine,
                               bias=bias and elementwise_affine), position)


def rms_norm(num_features: int, position: str = "attn", eps: float = 1e-6,
             elementwise_affine: bool = True) -> nn.Module:
    """Root-mean-square normalisation with a learned scale and no centring.

    Args:
        num_features: size of the feature dimension (supplied by ponder).
        position: where the norm sits: attn, ffn, final, or conv for channels-first features.
        eps: added to the mean square for numerical stability.
        elementwise_affine: learn a per-feature scale.
    """
    return _place(RMSNorm(num_features, eps=eps, elementwise_affine=elementwise_affine), position)
