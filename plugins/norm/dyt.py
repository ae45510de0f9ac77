"""DyT and ADyT: normalisation replaced by a scaled tanh (maths in ALGORITHMS.md).

``DynamicTanh``: ``y = weight * tanh(alpha * x) + bias`` with one learnable ``alpha``.

``AdaptiveDynamicTanh`` (after the public ADyT reference):
``alpha(t) = clip(alpha0 * (1 + lambda / (eps + G_t)), alpha_min, alpha_max)`` where ``G_t`` is an EMA of
the L2 norm of the layer's own gradients, updated by ``update_adyt_grad_norms(model)`` after
``backward()`` and before ``optimizer.step()``.

In ponder's language model (which passes ``input_std``) the factories apply the language-model recipe measured in
docs/norms.md: alpha starts at ``1 / input_std`` (4.42 at width 128) and learns at 10x the optimizer's rate, and
the model scales its embeddings (``keeps_input_scale``); ADyT's clip keeps the reference's ratios to alpha0.
Elsewhere the reference defaults hold (alpha 0.5, ADyT's clip 0.1..2.0).

Where we differ from the public reference, on purpose: ``G`` is a buffer in the state dict, and
eval and ONNX export use the same ``alpha(t)`` computed from the frozen ``G``. The reference uses
``alpha0`` alone at eval time, so its model computes something different in eval from what it
trained with.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ponder.contracts.norms import (  # noqa: F401  (the capabilities implemented here)
    FoldableNorm,
    KeepsInputScale,
    NeedsController,
    ScaledLearningRates,
)

# A model that ran this many training forwards without a gradient-norm update is warned about.
_UNUPDATED_FORWARDS_WARNING = 50


def _size(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    return (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)


class ScaledTanh(nn.Module):
    """``tanh(alpha * x)``: what a DyT layer leaves in the exported graph once its affine is folded away."""

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.alpha * x)


class DynamicTanh(nn.Module):
    """``weight * tanh(alpha * x) + bias``: a normalisation layer without statistics.

    A :class:`~ponder.contracts.norms.FoldableNorm`: export folds the affine into the next linear layer.

    Args:
        normalized_shape: size of the channel dimension.
        channels_last: True: channels are the last dimension; False: channels-first features (NCHW, NCL).
        alpha_init_value: initial value of the learnable scalar alpha.
        bias: learn a per-channel shift (the LLaMA variant drops it).
    """

    def __init__(self, normalized_shape: int | Sequence[int], channels_last: bool = True,
                 alpha_init_value: float = 0.5, bias: bool = True) -> None:
        super().__init__()
        self.normalized_shape = _size(normalized_shape)
        self.channels_last = channels_last
        self.alpha_init_value = alpha_init_value
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init_value)))
        self.weight = nn.Parameter(torch.ones(self.normalized_shape))
        self.bias = nn.Parameter(torch.zeros(self.normalized_shape)) if bias else None

    keeps_input_scale = True  # no statistics: ponder's language model scales its embeddings for it
    lr_scales: dict[str, float] = {}  # {"alpha": 10.0}: alpha learns at 10x the optimizer's lr (ScaledLearningRates)

    def current_alpha(self) -> Tensor:
        return self.alpha

    def _affine(self, y: Tensor) -> Tensor:
        weight, bias = self.weight, self.bias
        if not self.channels_last:  # broadcast [C] over [N, C, *spatial]
            shape = (-1,) + (1,) * (y.dim() - 2)
            weight = weight.view(shape)
            bias = bias.view(shape) if bias is not None else None
        y = y * weight
        return y + bias if bias is not None else y

    def forward(self, x: Tensor) -> Tensor:
        return self._affine(torch.tanh(self.current_alpha() * x))

    def metrics(self) -> dict[str, float]:
        """What the trainer logs for this layer."""
        return {"alpha": float(self.alpha.detach())}

    def split_affine(self) -> tuple[nn.Module, Tensor, Tensor | None] | None:
        """``(tanh(alpha x) at today's alpha, weight, bias)``; None for channels-first layers."""
        if not self.channels_last or self.weight.dim() != 1:
            return None
        return ScaledTanh(float(self.current_alpha().detach().reshape(()))), self.weight, self.bias

    def extra_repr(self) -> str:
        return (f"normalized_shape={self.normalized_shape}, alpha_init_value={self.alpha_init_value}, "
                f"channels_last={self.channels_last}")


class AdaptiveDynamicTanh(DynamicTanh):
    """DyT whose alpha adapts to the layer's smoothed gradient norm (the public ADyT reference's API).

    A :class:`~ponder.contracts.norms.NeedsController`: the trainer adds the ``adyt`` controller for it.

    Args:
        normalized_shape: size of the channel dimension.
        channels_last: True: channels are the last dimension; False: channels-first features (NCHW, NCL).
        alpha_init_value: initial value of the learnable alpha0.
        lambda_factor: strength of the adjustment (lambda).
        smooth_factor: EMA factor of the gradient norm (beta).
        eps: keeps 1 / (eps + G) finite.
        alpha_min: lower clip of the adapted alpha.
        alpha_max: upper clip of the adapted alpha.
        bias: learn a per-channel shift.
    """

    def __init__(self, normalized_shape: int | Sequence[int], channels_last: bool = True,
                 alpha_init_value: float = 0.5, lambda_factor: float = 0.1, smooth_factor: float = 0.99,
                 eps: float = 1e-6, alpha_min: float = 0.1, alpha_max: float = 2.0, bias: bool = True) -> None:
        if not 0.0 <= smooth_factor < 1.0:
            raise ValueError(f"smooth_factor must be in [0, 1), got {smooth_factor}")
        if not 0.0 < alpha_min <= alpha_max:
            raise ValueError(f"need 0 < alpha_min <= alpha_max, got alpha_min={alpha_min}, alpha_max={alpha_max}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        super().__init__(normalized_shape, channels_last, alpha_init_value, bias)
        self.lambda_factor, self.smooth_factor, self.eps = lambda_factor, smooth_factor, eps
        self.alpha_min, self.alpha_max = alpha_min, alpha_max
        self.register_buffer("grad_norm", torch.ones(()))  # G_t, starts at 1.0
        self._unupdated_forwards = 0

    training_controller = "adyt"  # updates grad_norm after backward, before the optimizer step

    def compute_alpha(self) -> Tensor:
        """``clip(alpha0 * (1 + lambda / (eps + G)), alpha_min, alpha_max)``."""
        alpha = self.alpha * (1.0 + self.lambda_factor / (self.eps + self.grad_norm))
        return alpha.clamp(self.alpha_min, self.alpha_max)

    current_alpha = compute_alpha

    def forward(self, x: Tensor) -> Tensor:
        if self.training and torch.is_grad_enabled():
            self._unupdated_forwards += 1
            if self._unupdated_forwards == _UNUPDATED_FORWARDS_WARNING:
                warnings.warn(
                    f"AdaptiveDynamicTanh ran {_UNUPDATED_FORWARDS_WARNING} training steps without a gradient-norm "
                    "update, so its alpha does not adapt: call update_adyt_grad_norms(model) after backward() and "
                    "before optimizer.step() (ponder's trainer does it through the 'adyt' controller)",
                    RuntimeWarning, stacklevel=2)
        return super().forward(x)

    @torch.no_grad()
    def update_grad_norm(self, grad_norm: Tensor | None = None) -> None:
        """``G = beta * G + (1 - beta) * g``, with ``g`` the L2 norm of this layer's gradients
        (or ``grad_norm`` when the caller computed it). No host synchronisation."""
        if grad_norm is None:
            grads = [p.grad for p in self.parameters(recurse=False) if p.grad is not None]
            if not grads:
                return
            grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        self.grad_norm.mul_(self.smooth_factor).add_(grad_norm.to(self.grad_norm), alpha=1.0 - self.smooth_factor)
        self._unupdated_forwards = 0

    def metrics(self) -> dict[str, float]:
        return {"alpha": float(self.compute_alpha().detach()), "alpha0": float(self.alpha.detach()),
                "grad_norm": float(self.grad_norm)}

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", lambda_factor={self.lambda_factor}, smooth_factor={self.smooth_factor}, "
                f"alpha_range=({self.alpha_min}, {self.alpha_max})")


@torch.no_grad()
def update_adyt_grad_norms(model: nn.Module) -> int:
    """Update every ``AdaptiveDynamicTanh`` in ``model`` from its gradients, all layers in one pass
    (one ``_foreach_norm`` over every gradient, no host sync). Call after ``loss.backward()`` and
    before ``optimizer.step()``. Returns how many layers were updated."""
    layers = [m for m in model.modules() if isinstance(m, AdaptiveDynamicTanh)]
    grads: list[Tensor] = []
    owner: list[int] = []
    for i, layer in enumerate(layers):
        for p in layer.parameters(recurse=False):
            if p.grad is not None:
                grads.append(p.grad)
                owner.append(i)
    if not grads:
        return 0
    squares = torch.stack(torch._foreach_norm(grads)).float() ** 2
    index = torch.tensor(owner, device=squares.device)
    norms = torch.zeros(len(layers), device=squares.device).index_add_(0, index, squares).sqrt()
    updated = sorted(set(owner))
    for i in updated:
        layers[i].update_grad_norm(norms[i])
    return len(updated)


def default_alpha(position: str, input_std: float | None) -> float:
    """``alpha_init_value`` when none is given. Where the model says the std of the norm's input at initialisation
    (``input_std``; ponder's language model: ``0.02 sqrt(d_model)`` with its scaled embeddings), ``1 / input_std``,
    so that ``alpha * x`` starts at unit scale: 4.42 at width 128, and 0.78 at width 4096, where the DyT paper's
    LLaMA-7B uses 0.8 before attention. Otherwise (vision, converting a model, ``conv``) 0.5, the paper's default.
    Measured in docs/norms.md."""
    if input_std is None or position == "conv":
        return 0.5
    return round(1.0 / input_std, 2)


def default_alpha_lr_scale(position: str, input_std: float | None) -> float:
    """How much faster than the other weights alpha learns when ``alpha_lr_scale`` is unset: 10x in ponder's language
    model (its residual stream grows 5-30x in 600 steps at lr 3e-3, and alpha, moving about lr per step under Adam,
    cannot follow it otherwise: docs/norms.md), 1x elsewhere (the paper's)."""
    return 1.0 if input_std is None or position == "conv" else LM_ALPHA_LR_SCALE


LM_ALPHA_LR_SCALE = 10.0


def _with_lr_scale(module: DynamicTanh, scale: float) -> DynamicTanh:
    if scale <= 0:
        raise ValueError(f"alpha_lr_scale must be > 0, got {scale}")
    if scale != 1.0:
        module.lr_scales = {"alpha": float(scale)}
    return module


def dyt(num_features: int, position: str = "attn", alpha_init_value: float | None = None, bias: bool = True,
        alpha_lr_scale: float | None = None, input_std: float | None = None) -> nn.Module:
    """DynamicTanh: ``weight * tanh(alpha * x) + bias``, no statistics.

    Args:
        num_features: size of the channel dimension (supplied by ponder).
        position: where the norm sits: attn, ffn, final, or conv for channels-first features.
        alpha_init_value: initial alpha; unset: ``default_alpha`` (in ponder's language model ``1 / (0.02
            sqrt(d_model))``: 4.42 at width 128; else 0.5). Per position via [norm.positions.attn] etc.
        bias: learn a per-channel shift (the LLaMA variant drops it).
        alpha_lr_scale: alpha's learning rate as a multiple of the optimizer's; unset: 10 in ponder's language
            model, else 1 (``default_alpha_lr_scale``).
        input_std: the std of this norm's input at initialisation (supplied by ponder's language model).
    """
    alpha = default_alpha(position, input_std) if alpha_init_value is None else alpha_init_value
    module = DynamicTanh(num_features, channels_last=position != "conv", alpha_init_value=alpha, bias=bias)
    return _with_lr_scale(module, default_alpha_lr_scale(position, input_std) if alpha_lr_scale is None
                          else alpha_lr_scale)


def adyt(num_features: int, position: str = "attn", alpha_init_value: float | None = None,
         lambda_factor: float = 0.1, smooth_factor: float = 0.99, eps: float = 1e-6, alpha_min: float | None = None,
         alpha_max: float | None = None, bias: bool = True, alpha_lr_scale: float | None = None,
         input_std: float | None = None) -> nn.Module:
    """Adaptive DyT: alpha follows the layer's smoothed gradient norm.

    Args:
        num_features: size of the channel dimension (supplied by ponder).
        position: where the norm sits: attn, ffn, final, or conv for channels-first features.
        alpha_init_value: initial alpha0; unset: DyT's ``default_alpha`` (4.42 at width 128 in ponder's language
            model, else 0.5, the reference's).
        lambda_factor: strength of the adjustment (lambda).
        smooth_factor: EMA factor of the gradient norm (beta).
        eps: keeps 1 / (eps + G) finite.
        alpha_min: lower clip of the adapted alpha; unset: ``alpha0 / 5`` (the reference's 0.1 for its 0.5).
        alpha_max: upper clip of the adapted alpha; unset: ``alpha0 * 4`` (the reference's 2.0 for its 0.5).
        bias: learn a per-channel shift.
        alpha_lr_scale: alpha0's learning rate as a multiple of the optimizer's; unset: as for ``dyt``.
        input_std: the std of this norm's input at initialisation (supplied by ponder's language model).
    """
    alpha = default_alpha(position, input_std) if alpha_init_value is None else alpha_init_value
    low, high = alpha * ADYT_RANGE[0], alpha * ADYT_RANGE[1]
    low = low if alpha_min is None else alpha_min
    high = high if alpha_max is None else alpha_max
    module = AdaptiveDynamicTanh(num_features, position != "conv", alpha, lambda_factor, smooth_factor, eps, low,
                                 high, bias)
    return _with_lr_scale(module, default_alpha_lr_scale(position, input_std) if alpha_lr_scale is None
                          else alpha_lr_scale)


# the adapted alpha's clip range as multiples of alpha0: the reference's (0.1, 2.0) around its 0.5
ADYT_RANGE = (0.2, 4.0)
