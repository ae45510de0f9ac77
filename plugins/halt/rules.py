"""Halting rules: when each token stops going deeper, and what that costs in the loss.

Each is a :class:`ponder.contracts.halting.HaltingRule` (the contract every halting plugin implements) and shares
its one per-layer step, pure tensor maths on ``[batch, seq]`` tensors, so the same code runs in training and
inside an exported ONNX loop. The maths is in ALGORITHMS.md (ACT, PonderNet).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ponder.contracts.halting import HaltingRule, HaltState, pick

__all__ = ["ACT", "FixedDepth", "HaltState", "HaltingRule", "PonderNet", "pick"]


class ACT(HaltingRule):
    """Graves' Adaptive Computation Time over depth.

    Args:
        d_model: model width (supplied by ponder).
        n_layers: number of layers (supplied by ponder).
        act_lambda: weight of the ponder cost ``N + R`` in the loss.
        bias_init: initial halting bias; negative (about -3) so tokens start deep instead of collapsing to depth 2.
    """

    weighted_output = True

    def __init__(self, d_model: int, n_layers: int, act_lambda: float = 0.01, bias_init: float = -3.0) -> None:
        if act_lambda < 0:
            raise ValueError(f"act_lambda must be >= 0, got {act_lambda}")
        super().__init__(d_model, n_layers, bias_init)
        self.act_lambda = act_lambda

    def mass(self, s: Tensor, layer: int | Tensor, cum: Tensor) -> Tensor:
        return self.probability(s, layer)

    def aux_term(self, p: Tensor, halt_now: Tensor, remaining: Tensor, layer: int | Tensor) -> Tensor:
        return torch.where(halt_now, remaining, torch.zeros_like(remaining))  # the remainder R

    def ponder_cost(self, state: HaltState) -> Tensor:
        """Per-token ``N + R``."""
        return state.depth + state.aux

    def loss(self, state: HaltState) -> Tensor:
        return self.act_lambda * self.ponder_cost(state).mean()


class PonderNet(HaltingRule):
    """PonderNet: ``p_n = lambda_n * prod_{j<n}(1 - lambda_j)`` with a geometric prior.

    Args:
        d_model: model width (supplied by ponder).
        n_layers: number of layers (supplied by ponder).
        lambda_p: parameter of the geometric prior over halting layers.
        beta: weight of ``KL(p || Geometric(lambda_p))`` in the loss.
        bias_init: initial bias of the halting unit lambda_n.
    """

    per_layer_task_loss = True

    def __init__(self, d_model: int, n_layers: int, lambda_p: float = 0.2, beta: float = 0.01,
                 bias_init: float = -2.0) -> None:
        if not 0.0 < lambda_p < 1.0:
            raise ValueError(f"lambda_p must be in (0, 1), got {lambda_p}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        super().__init__(d_model, n_layers, bias_init)
        self.lambda_p, self.beta = lambda_p, beta
        k = torch.arange(n_layers, dtype=torch.float32)
        log_prior = k * math.log1p(-lambda_p) + math.log(lambda_p)
        self.register_buffer("log_prior", log_prior - torch.logsumexp(log_prior, 0), persistent=False)

    def mass(self, s: Tensor, layer: int | Tensor, cum: Tensor) -> Tensor:
        return self.probability(s, layer) * (1.0 - cum)

    def aux_term(self, p: Tensor, halt_now: Tensor, remaining: Tensor, layer: int | Tensor) -> Tensor:
        return p * (torch.log(p.clamp_min(1e-12)) - pick(self.log_prior, layer))  # this layer's share of the KL

    def loss(self, state: HaltState) -> Tensor:
        return self.beta * state.aux.mean()


class FixedDepth(HaltingRule):
    """Every token runs every layer: the baseline without halting.

    Args:
        d_model: model width (supplied by ponder).
        n_layers: number of layers (supplied by ponder).
    """

    def __init__(self, d_model: int, n_layers: int) -> None:
        super().__init__(d_model, n_layers, bias_init=None)

    def mass(self, s: Tensor, layer: int | Tensor, cum: Tensor) -> Tensor:
        return torch.zeros_like(cum)
