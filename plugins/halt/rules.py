"""Halting rules: when each token stops going deeper, and what that costs in the loss.

Every rule shares one per-layer step (:meth:`HaltingRule.step`), pure tensor maths on
``[batch, seq]`` tensors, so the same code runs in training and inside an exported ONNX loop.
The maths is in ALGORITHMS.md (ACT, PonderNet).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn


def pick(stacked: Tensor, layer: int | Tensor) -> Tensor:
    """Row ``layer`` of a per-layer stack; by ``index_select`` when the index is a tensor (the
    exported layer loop), which export can trace without knowing the value."""
    if isinstance(layer, Tensor):
        return torch.index_select(stacked, 0, layer.reshape(1)).squeeze(0)
    return stacked[layer]


class HaltState(NamedTuple):
    """What the layer loop carries per token (shapes ``[B, T]`` unless noted)."""

    halted: Tensor  # bool: halted at or before the last layer run
    cum: Tensor  # halting weight assigned so far; exactly 1 once halted
    depth: Tensor  # layers run for this token (N), as a float count
    output: Tensor  # [B, T, d] output state (ACT: the weighted sum; others: the state at halting)
    hidden: Tensor  # [B, T, d] next layer's input: new state while running, output once halted (frozen)
    weight: Tensor  # this layer's halting weight p_n (0 for tokens already halted)
    aux: Tensor  # the rule's per-token loss accumulator (ACT: remainder R; PonderNet: KL terms)


class HaltingRule(nn.Module):
    """Base class: a per-layer halting unit ``sigmoid(w_n . s + b_n)`` and the shared step."""

    weighted_output = False  # ACT outputs the halting-weighted mean of the states
    per_layer_task_loss = False  # PonderNet's task loss is the expectation over halting layers

    def __init__(self, d_model: int, n_layers: int, bias_init: float | None = -3.0) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.n_layers = n_layers
        if bias_init is not None:  # one halting unit per layer, stacked ([L, d], [L]) for export
            self.weight = nn.Parameter(torch.zeros(n_layers, d_model))
            self.bias = nn.Parameter(torch.full((n_layers,), float(bias_init)))

    def init_state(self, x: Tensor) -> HaltState:
        zeros = x.new_zeros(x.shape[:-1])
        return HaltState(zeros.bool(), zeros, zeros, torch.zeros_like(x), x, zeros, zeros)

    def probability(self, s: Tensor, layer: int | Tensor) -> Tensor:
        """The halting unit after ``layer``: ``sigmoid(w . s + b)`` per token."""
        return torch.sigmoid(s @ pick(self.weight, layer) + pick(self.bias, layer))

    def mass(self, s: Tensor, layer: int | Tensor, cum: Tensor) -> Tensor:
        """Halting weight this layer would take if the token does not halt here."""
        raise NotImplementedError

    def step(self, state: HaltState, s: Tensor, layer: int | Tensor, threshold: float | Tensor) -> HaltState:
        """Advance every token by one layer whose new states are ``s`` ([B, T, d]).

        A running token halts when its cumulative weight reaches ``threshold`` (never early
        when the threshold is 1.0) or at the last layer; it then takes the remainder
        ``1 - cum`` as its weight, so weights sum to one. Halted tokens are left unchanged.
        """
        running = ~state.halted
        remaining = 1.0 - state.cum
        mass = self.mass(s, layer, state.cum)
        if isinstance(threshold, Tensor):
            threshold = threshold.to(s.dtype)
        last = layer >= self.n_layers - 1  # a bool, or a bool tensor when the layer index is one
        early = (state.cum + mass >= threshold) & (threshold < 1.0)
        halt_now = running & (early | last)
        p = torch.where(halt_now, remaining, torch.minimum(mass, remaining)) * running
        if self.weighted_output:
            output = state.output + p.unsqueeze(-1) * s
        else:
            output = torch.where(halt_now.unsqueeze(-1), s, state.output)
        halted = state.halted | halt_now
        hidden = torch.where(halted.unsqueeze(-1), output, s)
        aux = state.aux + self.aux_term(p, halt_now, remaining, layer)
        return HaltState(halted, state.cum + p, state.depth + running.to(s.dtype), output, hidden, p, aux)

    def aux_term(self, p: Tensor, halt_now: Tensor, remaining: Tensor, layer: int | Tensor) -> Tensor:
        return torch.zeros_like(p)

    def loss(self, state: HaltState) -> Tensor:
        """The rule's own loss term (a scalar), added to the task loss."""
        return state.aux.new_zeros(())


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
