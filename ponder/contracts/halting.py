"""The halting contract: what a halting rule is, for the built-ins and third-party rules alike.

A halting plugin registers ``factory(d_model, n_layers, **settings) -> HaltingRule``. The model and the exported
graph use a rule through four things only:

- ``init_state(x) -> HaltState``: the state before the first layer, from the embeddings ``x`` ``[B, T, d]``.
- ``step(state, s, layer, threshold) -> HaltState``: after layer ``layer`` produced the new states ``s``
  ``[B, T, d]``, advance every token. Pure tensor maths: it also runs inside the exported ONNX loop, where
  ``layer`` and ``threshold`` are tensors (use :func:`pick` to read a per-layer parameter). ``threshold`` may be
  one per batch row, ``[B, 1]`` (a batch of requests at different thresholds; ``[B, n]`` rows in a compacted
  layer): use it elementwise, so it broadcasts over the tokens. A token halts when its cumulative weight reaches
  ``threshold`` (never early at 1.0) or at the last layer; halted tokens must be left unchanged (padding starts
  halted), and ``hidden`` of a halted token is its frozen ``output``.
- ``loss(state) -> Tensor``: the rule's own scalar loss term (ponder cost, KL, ...), added to the task loss.
- ``per_layer_task_loss``: True when the task loss is the expectation over halting layers (PonderNet) rather
  than the loss of the output state.

:class:`HaltingRule` implements ``step`` once for every rule that halts on cumulative weight: a subclass
defines ``mass`` (the weight this layer would take) and, if it has one, ``aux_term`` (its per-token loss
accumulator) and ``loss``. Set ``weighted_output = True`` for ACT's weighted mean of the states. A rule with
a different ``step`` may override it, as long as it keeps the contract above and stays exportable.
"""

from __future__ import annotations

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
        """The halting unit after ``layer``: ``sigmoid(w . s + b)`` per token. The weight as a ``[d, 1]`` matrix:
        ONNX Runtime multiplies ``[B, T, d]`` by a matrix 8x faster than by a vector (33 against 275 us at
        batch 8 x 128 tokens)."""
        return torch.sigmoid((s @ pick(self.weight, layer)[:, None]).squeeze(-1) + pick(self.bias, layer))

    def mass(self, s: Tensor, layer: int | Tensor, cum: Tensor) -> Tensor:
        """Halting weight this layer would take if the token does not halt here (``[B, T]``); every subclass
        that uses the shared ``step`` defines it."""
        raise NotImplementedError(f"{type(self).__name__} must define mass(s, layer, cum)")

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
        """This layer's addition to the per-token loss accumulator ``aux`` (default: nothing)."""
        return torch.zeros_like(p)

    def loss(self, state: HaltState) -> Tensor:
        """The rule's own loss term (a scalar), added to the task loss."""
        return state.aux.new_zeros(())
