"""Decoding with a KV cache where each token pays for its own depth, in PyTorch: the reference the exported
decode graph is checked against (``ponder.graph.build_decode``), and ``generate`` for the library.

A decode step takes the new tokens ``input_ids [B, t]``, the cache of every layer (``past``: keys and values
``[B, kv_heads, P, head_dim]``, RoPE applied) and ``attention_mask [B, P + t]`` (1: a real token, 0: padding, so
rows of different lengths can share a step; positions are its running count). Layer by layer:

- while some new token runs, the layer's full step runs (attention over the cache and the new tokens, the MLP,
  the halting rule's step), exactly as the full forward computes those tokens;
- once every new token has halted, a later layer only *fills the cache*: keys and values of its frozen state
  (``hidden``, which is its output once halted), as the full forward computes them for a halted token.

So a step at depth d costs d full layers and L - d key/value fills. Prefill is the same step with an empty cache.
Generating through the cache gives the logits of re-running the whole window (``tests/test_decode.py``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ponder.contracts.halting import HaltState
from ponder.errors import ConfigError
from ponder.generation import SamplingParams, Step, Token, generate, text_bytes
from ponder.model import Block, PonderLM, Rows, apply_rope, halt_padding


class KV(NamedTuple):
    """One layer's cache: keys (RoPE applied) and values, ``[B, kv_heads, positions, head_dim]``."""

    key: Tensor
    value: Tensor


@dataclass
class DecodeOutput:
    logits: Tensor  # [B, t, vocab]: the new positions
    present: list[KV]  # the cache after this step, one per layer
    depth: Tensor  # [B, t] layers each new token ran
    layers_executed: int  # layers whose full step ran (the rest filled the cache only)


def decode_tables(attention_mask: Tensor, t: int, head_dim: int, rope_base: float | Tensor, n_heads: int,
                  n_local: int, window: int | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """RoPE tables of the new tokens ``[B, 1, t, head_dim]`` (cos, sin) and the attention mask
    ``[B, n_heads, t, P + t]`` (True: may attend) from ``attention_mask`` ``[B, P + t]``.

    A position is the count of real tokens before it. A new token sees the real tokens at or before its position;
    a local head only the ``window`` most recent of them. Each token always sees itself, so a padding row has
    finite (unused) values."""
    valid = attention_mask.to(torch.bool)
    pos = (torch.cumsum(attention_mask.to(torch.int64), dim=1) - 1).clamp(min=0)  # [B, S]
    s = pos.shape[1]
    q_pos = pos[:, s - t:]  # [B, t]
    inv_freq = torch.as_tensor(rope_base, dtype=torch.float32) ** (
        -torch.arange(0, head_dim, 2, dtype=torch.float32, device=attention_mask.device) / head_dim)
    angles = q_pos.to(torch.float32)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, t, head_dim]
    dist = q_pos[:, :, None] - pos[:, None, :]  # [B, t, S]
    causal = (dist >= 0) & valid[:, None, :]
    local = causal & (dist < window)
    is_local = (torch.arange(n_heads, device=attention_mask.device) >= n_heads - n_local)[None, :, None, None]
    mask = (is_local & local[:, None]) | (~is_local & causal[:, None])  # boolean logic: ONNX Runtime has no bool Where
    own = torch.arange(s, device=attention_mask.device)[None, :] == (torch.arange(t, device=attention_mask.device)
                                                                      + (s - t))[:, None]
    return angles.cos(), angles.sin(), mask | own[None, None]


def cached_layer(block: Block, halting: nn.Module, state: HaltState, layer: int | Tensor,
                 threshold: float | Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
                 past: KV) -> tuple[HaltState, KV]:
    """One layer's full step for the new tokens, attending over ``past`` and themselves; returns the new state
    and the layer's cache with the new tokens' keys and values appended."""
    x = state.hidden
    b, t, d = x.shape
    attn = block.attn
    h = attn.n_heads
    qkv = attn.qkv(block.norm_attn(x)).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
    q, k = apply_rope(qkv[:2], cos, sin)  # one rotation for queries and keys
    keys = torch.cat([past.key, k], dim=2)
    values = torch.cat([past.value, qkv[2]], dim=2)
    y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    x = x + attn.proj(y.transpose(1, 2).reshape(b, t, d))
    s = x + block.mlp(block.norm_ffn(x))
    return halting.step(state, s, layer, threshold), KV(keys, values)


def decode_rows(halted: Tensor, n: int, mask: Tensor) -> Rows:
    """The rows of a compacted step over the new tokens that still run (``n`` per batch row, the most running in
    a row; see ``ponder.model.Rows``), with their rows of the per-row attention ``mask`` [B, heads, t, P + t]."""
    b, t = halted.shape
    pos = torch.topk((~halted).to(torch.float32), n, dim=1).indices  # running (1.0) before halted (0.0)
    flat = (pos + torch.arange(b, device=pos.device)[:, None] * t).reshape(-1)
    rows = Rows(pos, flat, mask)
    return rows._replace(mask=rows.take(mask.transpose(1, 2)).transpose(1, 2))


def compacted_cached_layer(block: Block, halting: nn.Module, state: HaltState, layer: int | Tensor,
                           threshold: float | Tensor, cos: Tensor, sin: Tensor, rows: Rows,
                           past: KV) -> tuple[HaltState, KV]:
    """:func:`cached_layer` for the running ``rows`` only: keys and values for every new token (the cache needs
    them), the query, attention, projection, MLP and halting step for the rows alone (the prefill of a long
    prompt, as ``ponder.model.compacted_step`` for scoring)."""
    x = state.hidden
    b, t, d = x.shape
    attn = block.attn
    h = attn.n_heads
    weight, bias = attn.qkv.weight, attn.qkv.bias
    normed = block.norm_attn(x)
    k, v = F.linear(normed, weight[d:], None if bias is None else bias[d:]).view(b, t, 2, h, d // h).permute(
        2, 0, 3, 1, 4)
    keys = torch.cat([past.key, apply_rope(k, cos, sin)], dim=2)
    values = torch.cat([past.value, v], dim=2)
    n = rows.pos.shape[1]
    q = F.linear(rows.take(normed), weight[:d], None if bias is None else bias[:d]).view(b, n, h, d // h)
    cos_rows, sin_rows = rows.take(cos[:, 0]).unsqueeze(1), rows.take(sin[:, 0]).unsqueeze(1)
    y = F.scaled_dot_product_attention(apply_rope(q.transpose(1, 2), cos_rows, sin_rows), keys, values,
                                       attn_mask=rows.mask)
    xr = rows.take(x) + attn.proj(y.transpose(1, 2).reshape(b, n, d))
    s = xr + block.mlp(block.norm_ffn(xr))
    taken = HaltState(*(rows.take(field) for field in state))
    new = halting.step(taken, s, layer, threshold)
    merged = HaltState(*(rows.put(full, part) for full, part in zip(state, new, strict=True)))
    # this layer's halting weight is 0 for every token it did not run, as in the dense step
    return merged._replace(weight=rows.put(torch.zeros_like(state.weight), new.weight)), KV(keys, values)


def fill_layer(block: Block, hidden: Tensor, cos: Tensor, sin: Tensor, past: KV) -> KV:
    """The layer's cache for new tokens that have all halted: keys and values of their frozen state, the key and
    value rows of the layer's projection only."""
    b, t, d = hidden.shape
    attn = block.attn
    h = attn.n_heads
    weight, bias = attn.qkv.weight[d:], None if attn.qkv.bias is None else attn.qkv.bias[d:]
    k, v = F.linear(block.norm_attn(hidden), weight, bias).view(b, t, 2, h, d // h).permute(2, 0, 3, 1, 4)
    return KV(torch.cat([past.key, apply_rope(k, cos, sin)], dim=2), torch.cat([past.value, v], dim=2))


def new_state(model: PonderLM, input_ids: Tensor, attention_mask: Tensor) -> HaltState:
    """The halting state of the new tokens before the first layer; padding (``attention_mask`` 0) halted."""
    state = model.halting.init_state(model.embed(input_ids))
    return halt_padding(state, attention_mask[:, attention_mask.shape[1] - input_ids.shape[1]:] == 0)


def empty_cache(model: PonderLM, batch: int) -> list[KV]:
    cfg = model.cfg
    shape = (batch, cfg.n_heads, 0, cfg.d_model // cfg.n_heads)
    device = model.embed.weight.device
    return [KV(torch.zeros(shape, device=device), torch.zeros(shape, device=device)) for _ in model.blocks]


@torch.no_grad()
def decode_step(model: PonderLM, input_ids: Tensor, past: Sequence[KV] | None = None,
                attention_mask: Tensor | None = None, threshold: float | Tensor | None = None,
                compaction_cutoff: float | None = None) -> DecodeOutput:
    """One step through the cache (see the module's docstring); ``past`` None is an empty cache (prefill).
    ``threshold``: a float, or a tensor (a scalar or one per batch row ``[B]``, each row halting by its own).
    A new token whose ``attention_mask`` is 0 (padding) starts halted with depth 0: no layer runs for it.

    A layer runs compacted (its running new tokens only, :func:`compacted_cached_layer`) as the scoring forward
    chooses: when ``model.compaction`` is not "off" and the most running tokens in a row are at most
    ``compaction_cutoff`` (default: the model's) of the new tokens. A step of one new token never compacts."""
    cfg = model.cfg
    b, t = input_ids.shape
    past = list(past) if past is not None else empty_cache(model, b)
    if len(past) != cfg.n_layers:
        raise ConfigError(f"the cache has {len(past)} layers; the model has {cfg.n_layers}")
    total = past[0].key.shape[2] + t
    if total > cfg.max_seq_len:
        raise ConfigError(f"{total} positions exceed the model's max_seq_len {cfg.max_seq_len}")
    if attention_mask is None:
        attention_mask = torch.ones((b, total), dtype=torch.int64, device=input_ids.device)
    threshold = model.threshold_for(threshold, b, input_ids.device)
    cutoff = model.compaction_cutoff if compaction_cutoff is None else compaction_cutoff
    compacting = model.compaction != "off" and t > 1  # one new token: nothing to compact
    cos, sin, mask = decode_tables(attention_mask, t, cfg.d_model // cfg.n_heads, model.dials.value("rope_base"),
                                   cfg.n_heads, cfg.n_local_heads, model.dials["attn_window"].as_int())
    state = new_state(model, input_ids, attention_mask)
    present, layers = [], 0
    for i, block in enumerate(model.blocks):
        most = int((~state.halted).sum(1).max())
        if i > 0 and most == 0:
            kv = fill_layer(block, state.hidden, cos, sin, past[i])
        else:
            # the share in float32, as the exported graph computes it, so both choose alike at the cutoff
            share = torch.tensor(most, dtype=torch.float32) / t
            if i > 0 and compacting and bool(share <= torch.tensor(cutoff, dtype=torch.float32)):
                rows = decode_rows(state.halted, most, mask)
                state, kv = compacted_cached_layer(block, model.halting, state, i, threshold, cos, sin, rows, past[i])
            else:
                state, kv = cached_layer(block, model.halting, state, i, threshold, cos, sin, mask, past[i])
            layers = i + 1
        present.append(kv)
    logits = model.head(model.norm_final(state.output))
    return DecodeOutput(logits, present, state.depth.to(torch.int64), layers)


def torch_step(model: PonderLM, threshold: float | None = None):
    """``ponder.generation``'s model step for one sequence, in PyTorch."""
    import time

    def step(new_ids: list[int], past: list[KV] | None) -> Step:
        start = time.perf_counter()
        out = decode_step(model, torch.tensor([new_ids], dtype=torch.int64, device=model.embed.weight.device),
                          past, threshold=threshold)
        return Step(out.logits[0, -1].float().cpu().numpy(), out.present, int(out.depth[0, -1]),
                    out.layers_executed, time.perf_counter() - start)

    return step


def generate_ids(model: PonderLM, prompt: Sequence[int], params: SamplingParams | None = None,
                 threshold: float | None = None, tokenizer: Any = None) -> Iterator[Token]:
    """Generate after ``prompt`` (token ids) through the cache; yields each token with its depth and cost.
    ``tokenizer`` turns the ids into text for stop strings (default: bytes, for a byte-level model)."""
    from ponder.text import ByteTokenizer

    model.eval()
    params = (params or SamplingParams()).check()
    if tokenizer is None and model.cfg.vocab_size == 256:
        tokenizer = ByteTokenizer()
    if tokenizer is None and params.stop:
        raise ConfigError("stop strings need the model's tokenizer (tokenizer=...)")
    text_of = text_bytes(tokenizer) if tokenizer is not None else (lambda ids: b"")
    return generate(torch_step(model, threshold), list(prompt), params, model.cfg.max_seq_len, text_of)
