"""The ACT language model: a decoder-only transformer whose tokens stop going deeper on their own.

embedding -> n_layers blocks (pre-norm causal attention with RoPE, some heads global and some
within a sliding window; pre-norm MLP), each followed by the halting rule's step -> final norm
-> LM head. Norms and the halting rule come from plugins. The layer loop stops as soon as every
token in the batch has halted, so ``layers_executed`` is the deepest token's depth. In eval a layer
can run on its running tokens only (compaction, :func:`compacted_step`), as the exported graph does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ponder import registry
from ponder.config import ModelConfig, PluginSpec, RunConfig
from ponder.contracts.halting import HaltState
from ponder.contracts.norms import INIT_STD, stream_std_at_init, wants_embedding_scale
from ponder.dials import Dial, Dials
from ponder.limits import THRESHOLD_HIGH, THRESHOLD_LOW


def rope_tables(seq_len: int, head_dim: int, base: float, device=None) -> tuple[Tensor, Tensor]:
    """cos and sin tables ``[seq_len, head_dim]`` for rotary position embeddings."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.arange(seq_len, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attention_mask(seq_len: int, n_heads: int, n_local: int, window: int, device=None) -> Tensor:
    """``[n_heads, T, T]`` boolean mask (True: may attend): causal for every head, and the last
    ``n_local`` heads only see the ``window`` most recent positions (themselves included)."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    causal = j <= i
    local = causal & (i - j < window)
    is_local = (torch.arange(n_heads, device=device) >= n_heads - n_local)[:, None, None]
    return (is_local & local) | (~is_local & causal)  # boolean logic, not where(): ONNX Runtime has no bool Where


def additive_mask(mask: Tensor) -> Tensor:
    """A boolean attention mask (True: may attend) as the float bias attention adds to its scores: 0, or the
    lowest float32 (no infinities in a graph; every query may attend to itself, so no row is all masked).
    Attention takes either; the exported graphs convert once, in their prologue, instead of in every layer's
    attention (ONNX Runtime: 1.8 ms against 0.6 ms per attention at batch 8 x 128 tokens)."""
    low = torch.finfo(torch.float32).min
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, low)


def padding(lengths: Tensor, t: int) -> Tensor:
    """``[B, t]``, True at the positions at or past each row's length (``lengths`` ``[B]``): right padding."""
    return torch.arange(t, device=lengths.device)[None, :] >= lengths.reshape(-1, 1)


def halt_padding(state: HaltState, pad: Tensor) -> HaltState:
    """The initial ``state`` with the ``pad`` tokens ([B, T] bool) halted from the start: depth 0, their weight
    taken (cum 1), so no layer updates them and none runs for them alone."""
    return state._replace(halted=state.halted | pad, cum=torch.maximum(state.cum, pad.to(state.cum.dtype)))


def row_threshold(threshold: Tensor, batch: int, check: Callable[[float], float]) -> Tensor:
    """A threshold tensor, a scalar or one per batch row (``[batch]``), as ``[1 or batch, 1]`` float32: it
    broadcasts over the tokens of ``[batch, seq]`` and over a compacted layer's rows ``[batch, n]``. ``check``
    vets each value (the dial's range)."""
    if threshold.dim() > 1 or threshold.numel() not in (1, batch):
        raise ValueError(f"a threshold tensor must be a scalar or one per batch row ([{batch}]), got "
                         f"{list(threshold.shape)}")
    for value in threshold.flatten().tolist():
        check(value)
    return threshold.to(torch.float32).reshape(-1, 1)


class Rows(NamedTuple):
    """The positions a compacted layer computes: in each batch row its running tokens first, ``n``
    per row (the largest running count; shorter rows are padded with halted tokens, which the
    halting step leaves unchanged). Only the batch rows with a running token take part (``active``): a row whose
    tokens have all halted needs no keys or values at this layer, since no query of its own attends to them."""

    pos: Tensor  # [A, n] positions, in the A active batch rows
    flat: Tensor  # [A * n] the same, as row indices of the flattened [B * T]
    mask: Tensor  # [A, n_heads, n, T] attention mask of those query rows
    active: Tensor | None = None  # [A] the batch rows taking part (None: every row, A = B)
    local: Tensor | None = None  # [A * n] row indices of the flattened active rows [A * T]

    @classmethod
    def running(cls, halted: Tensor, n: int, mask: Tensor, rows: int | None = None) -> Rows:
        """The rows for the tokens not ``halted`` ([B, T]); ``mask`` is the layer's [n_heads, T, T] mask.
        ``rows``: how many batch rows have a running token (None: take every row)."""
        b, t = halted.shape
        running = ~halted
        arange = torch.arange(rows if rows is not None else b, device=halted.device)[:, None] * t
        active = None
        if rows is not None:  # the rows with a running token first (1.0 before 0.0), exactly ``rows`` of them
            active = torch.topk(running.any(1).to(torch.float32), rows).indices
            running = running.index_select(0, active)
        pos = torch.topk(running.to(torch.float32), n, dim=1).indices  # running (1.0) before halted (0.0)
        local = (pos + arange).reshape(-1)
        flat = local if active is None else (pos + active[:, None] * t).reshape(-1)
        a = pos.shape[0]
        rows_mask = mask.index_select(1, pos.reshape(-1)).view(mask.shape[0], a, n, t).transpose(0, 1)
        return cls(pos, flat, rows_mask, active, None if active is None else local)

    def batch(self, x: Tensor) -> Tensor:
        """``[B, ...] -> [A, ...]``: the active batch rows."""
        return x if self.active is None else x.index_select(0, self.active)

    def take_local(self, x: Tensor) -> Tensor:
        """``[A, T, ...] -> [A, n, ...]``: :meth:`take` from a tensor of the active rows only."""
        if self.local is None:
            return self.take(x)
        a, n = self.pos.shape
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.local).view(a, n, *x.shape[2:])

    def take(self, x: Tensor) -> Tensor:
        """``[B, T, ...] -> [A, n, ...]`` (a row Gather)."""
        b, n = self.pos.shape
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.flat).view(b, n, *x.shape[2:])

    def put(self, full: Tensor, part: Tensor) -> Tensor:
        """``full`` with the rows replaced by ``part`` (a ScatterND)."""
        flat_full = full.reshape(-1, *full.shape[2:])
        return flat_full.index_put((self.flat,), part.reshape(-1, *full.shape[2:])).view(full.shape)

    def table(self, x: Tensor) -> Tensor:
        """A per-position table ``[T, k]`` (RoPE) at the rows: ``[B, 1, n, k]``."""
        b, n = self.pos.shape
        return x.index_select(0, self.pos.reshape(-1)).view(b, 1, n, x.shape[-1])


class TokenEmbedding(nn.Embedding):
    """Token embeddings, times a learnable scalar ``scale`` when the model has one (norms that keep their input's
    scale, :class:`~ponder.contracts.norms.KeepsInputScale`): ``scale`` starts at ``sqrt(d_model)``, as in the DyT
    paper's LLaMA models. Without it the module is a plain embedding with the same state-dict key (``weight``)."""

    def __init__(self, vocab_size: int, d_model: int) -> None:
        super().__init__(vocab_size, d_model)
        self.scale: nn.Parameter | None = None

    def add_scale(self) -> None:
        """Give the embedding its learnable scale, starting at ``sqrt(d_model)``."""
        self.scale = nn.Parameter(torch.tensor(self.embedding_dim ** 0.5))

    def forward(self, input_ids: Tensor) -> Tensor:
        x = super().forward(input_ids)
        return x if self.scale is None else x * self.scale

    def folded(self) -> nn.Embedding:
        """A plain embedding computing the same (``weight * scale``): what export puts in the graph."""
        plain = nn.Embedding(self.num_embeddings, self.embedding_dim, device=self.weight.device,
                             dtype=self.weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(self.weight if self.scale is None else self.weight * self.scale)
        return plain

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # a checkpoint written before embeddings were scaled computes x * 1
        if self.scale is not None and prefix + "scale" not in state_dict and prefix + "weight" in state_dict:
            state_dict[prefix + "scale"] = torch.ones(())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(qkv[:2], cos, sin)  # one rotation for queries and keys: half the graph's RoPE nodes
        y = F.scaled_dot_product_attention(q, k, qkv[2], attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))

    def forward_rows(self, x: Tensor, rows: Tensor, cos: Tensor, sin: Tensor, rows_cos: Tensor, rows_sin: Tensor,
                     rows_mask: Tensor) -> Tensor:
        """Attention output for the query rows ``rows`` ([B, n, d], normed) only; keys and values
        still come from every position of ``x`` ([B, T, d], normed)."""
        b, t, d = x.shape
        n, h = rows.shape[1], self.n_heads
        weight, bias = self.qkv.weight, self.qkv.bias
        q = F.linear(rows, weight[:d], None if bias is None else bias[:d]).view(b, n, h, d // h).transpose(1, 2)
        kv = F.linear(x, weight[d:], None if bias is None else bias[d:]).view(b, t, 2, h, d // h)
        k, v = kv.permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(apply_rope(q, rows_cos, rows_sin), apply_rope(k, cos, sin), v,
                                           attn_mask=rows_mask)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm attention and MLP with residuals; the norms come from a norm plugin."""

    def __init__(self, cfg: ModelConfig, norm: PluginSpec) -> None:
        super().__init__()
        self.norm_attn = make_norm(norm, cfg.d_model, "attn")
        self.attn = Attention(cfg.d_model, cfg.n_heads)
        self.norm_ffn = make_norm(norm, cfg.d_model, "ffn")
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.norm_attn(x), cos, sin, mask)
        return x + self.mlp(self.norm_ffn(x))

    def forward_rows(self, x: Tensor, xr: Tensor, rows: Rows, cos: Tensor, sin: Tensor) -> Tensor:
        """The block's output for ``rows`` of ``x`` only ([A, n, d]; ``xr`` holds them already):
        every position of the active batch rows is normed for the keys and values, the rest (query, projection,
        MLP) runs on the rows alone."""
        h = self.norm_attn(rows.batch(x))  # keys and values for the active batch rows only
        xr = xr + self.attn.forward_rows(h, rows.take_local(h), cos, sin, rows.table(cos), rows.table(sin),
                                         rows.mask)
        return xr + self.mlp(self.norm_ffn(xr))


def make_norm(spec: PluginSpec, d_model: int, position: str) -> nn.Module:
    """The norm at ``position``; a factory that takes ``input_std`` learns the std of its input at initialisation
    (the scaled embeddings' ``stream_std_at_init``, which DyT's default alpha follows)."""
    return registry.create("norm", spec.name, d_model, position=position, input_std=stream_std_at_init(d_model),
                           **spec.params_for(position))


COMPACTION_MODES = ("auto", "on", "off")
# auto compacts a layer when its rows to compute are at most this share of the sequence: below it the
# compacted step wins, above it the fixed cost (keys and values for every token, gather, scatter) loses.
# Measured with benchmarks/bench_export.py (docs/export.md).
DEFAULT_COMPACTION_CUTOFF = 0.5


def compacted_step(block: Block, halting: nn.Module, state: HaltState, layer: int | Tensor,
                   threshold: float | Tensor, cos: Tensor, sin: Tensor, rows: Rows) -> tuple[HaltState, Tensor]:
    """One layer and halting step computed for ``rows`` only; every other token has halted, so the
    dense step would leave it unchanged. Returns the new state and the rows' block outputs."""
    taken = HaltState(*(rows.take(field) for field in state))
    s = block.forward_rows(state.hidden, taken.hidden, rows, cos, sin)
    if isinstance(threshold, Tensor):  # [1 or B, 1]: the active rows' own
        threshold = rows.batch(threshold.expand(state.halted.shape[0], 1))
    new = halting.step(taken, s, layer, threshold)
    merged = HaltState(*(rows.put(full, part) for full, part in zip(state, new, strict=True)))
    # this layer's halting weight is 0 for every token it did not run, as in the dense step
    return merged._replace(weight=rows.put(torch.zeros_like(state.weight), new.weight)), s


@dataclass
class ModelOutput:
    logits: Tensor  # [B, T, vocab]
    layers_executed: int  # layers actually run: the deepest token's depth
    depth: Tensor  # [B, T] layers run per token, 1..n_layers
    loss: Tensor | None = None  # task loss + halting loss (what training minimises)
    task_loss: Tensor | None = None  # the task part (PonderNet: expected over halting layers)
    halt_loss: Tensor | None = None  # the halting rule's term (ponder cost, KL)
    ce: Tensor | None = None  # cross-entropy of the final logits (perplexity = exp(ce))


class PonderLM(nn.Module):
    """Decoder-only LM with per-token adaptive depth."""

    def __init__(self, cfg: ModelConfig, norm: PluginSpec | None = None, halting: PluginSpec | None = None) -> None:
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.norm_spec = norm or PluginSpec("layernorm")
        self.halting_spec = halting or PluginSpec("act")
        self.embed = TokenEmbedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, self.norm_spec) for _ in range(cfg.n_layers))
        self.norm_final = make_norm(self.norm_spec, cfg.d_model, "final")
        if wants_embedding_scale(self.norm_final):
            self.embed.add_scale()
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.compaction = "auto"  # in eval: run a layer on its running tokens only ("on", "auto", "off")
        self.compaction_cutoff = DEFAULT_COMPACTION_CUTOFF
        # in distributed training: "has every token halted?" over the global batch (see ponder.distributed)
        self.sync_halting: Callable[[Tensor], bool] | None = None
        self.apply(_init_weights)
        # created after the init above so the rule keeps its own (e.g. a negative halting bias)
        self.halting = registry.create("halting", self.halting_spec.name, cfg.d_model, cfg.n_layers,
                                       **self.halting_spec.params)
        self.dials = Dials(
            Dial("rope_base", cfg.rope_base, 10.0, 1e8, doc="RoPE base of every attention layer"),
            Dial("attn_window", cfg.attn_window, 1.0, float(cfg.max_seq_len), integer=True,
                 doc="sliding window of the local attention heads"),
            Dial("act_threshold", cfg.act_threshold, THRESHOLD_LOW, THRESHOLD_HIGH, min_inclusive=False,
                 doc="cumulative halting probability at which a token stops"),
        )

    def forward(self, input_ids: Tensor, targets: Tensor | None = None, threshold: float | Tensor | None = None,
                lengths: Tensor | None = None) -> ModelOutput:
        """``threshold``: a float, or a tensor (a scalar or one per batch row, ``[B]``; None: the dial's).
        ``lengths`` ``[B]``: rows right-padded to ``T``; a position at or past its row's length is padding,
        halted from the start (depth 0), never updated, and no layer runs for it (as the exported graph's
        ``row_lengths``)."""
        b, t = input_ids.shape
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds the model's max_seq_len {self.cfg.max_seq_len}")
        threshold = self.threshold_for(threshold, b, input_ids.device)
        head_dim = self.cfg.d_model // self.cfg.n_heads
        cos, sin = rope_tables(t, head_dim, self.dials.value("rope_base"), input_ids.device)
        mask = attention_mask(t, self.cfg.n_heads, self.cfg.n_local_heads, self.dials["attn_window"].as_int(),
                              input_ids.device)
        halting = self.halting
        state = halting.init_state(self.embed(input_ids))
        if lengths is not None:
            state = halt_padding(state, padding(lengths.to(input_ids.device), t))
        per_layer = halting.per_layer_task_loss and targets is not None
        expected_task = input_ids.new_zeros((b, t), dtype=state.cum.dtype)
        layers = 0
        compacting = not self.training and self.compaction != "off"
        for i, block in enumerate(self.blocks):
            rows = self.compact_rows(state.halted, mask) if compacting and i > 0 else None  # layer 0: all run
            if rows is None:
                s = block(state.hidden, cos, sin, mask)
                state = halting.step(state, s, i, threshold)
            else:
                state, s_rows = compacted_step(block, halting, state, i, threshold, cos, sin, rows)
                if per_layer:  # tokens outside the rows have weight 0 this layer
                    s = rows.put(torch.zeros_like(state.hidden), s_rows)
            layers = i + 1
            if per_layer:
                expected_task = expected_task + state.weight * _token_ce(self.head(self.norm_final(s)), targets)
            if layers < len(self.blocks) and self._all_halted(state.halted):
                break
        logits = self.head(self.norm_final(state.output))
        out = ModelOutput(logits, layers, state.depth)
        if targets is not None:
            out.ce = _token_ce(logits, targets).mean()
            out.task_loss = expected_task.mean() if per_layer else out.ce
            out.halt_loss = halting.loss(state)
            out.loss = out.task_loss + out.halt_loss
        return out

    def threshold_for(self, threshold: float | Tensor | None, batch: int, device=None) -> float | Tensor:
        """The threshold a forward uses: the dial's (None), a checked float, or a checked tensor as ``[1 or B, 1]``
        (:func:`row_threshold`)."""
        dial = self.dials["act_threshold"]
        if threshold is None:
            return dial.value
        if isinstance(threshold, Tensor):
            return row_threshold(threshold, batch, dial.check).to(device)
        return dial.check(threshold)

    def _all_halted(self, halted: Tensor) -> bool:
        """Whether the loop may stop. Training on several ranks, every rank runs until the global batch has
        halted: the layers run (and so the parameters used) agree, as in one process with the whole batch."""
        if self.training and self.sync_halting is not None:
            return self.sync_halting(halted.all())
        return bool(halted.all())

    def compact_rows(self, halted: Tensor, mask: Tensor) -> Rows | None:
        """The rows a compacted step would compute for the running tokens, or None when this layer
        runs densely (compaction "off", or "auto" with more rows than the cutoff share)."""
        most = (~halted).sum(1).max()
        n = int(most)
        if self.compaction == "off" or n == 0:
            return None
        # the share in float32, as the exported graph computes it, so both choose alike at the cutoff
        share = most.to(torch.float32) / halted.shape[1]
        if self.compaction == "auto" and not bool(share <= torch.tensor(self.compaction_cutoff, dtype=torch.float32)):
            return None
        return Rows.running(halted, n, mask, rows=int((~halted).any(1).sum()))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _token_ce(logits: Tensor, targets: Tensor) -> Tensor:
    b, t, v = logits.shape
    return F.cross_entropy(logits.reshape(b * t, v), targets.reshape(b * t), reduction="none").view(b, t)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=INIT_STD)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


def build_model(run: RunConfig, vocab_size: int) -> PonderLM:
    """The model a run config describes, for a vocabulary of ``vocab_size`` (what ``ponder train`` builds)."""
    cfg = dataclasses.replace(run.model, vocab_size=vocab_size)
    return PonderLM(cfg, norm=run.norm, halting=run.halting)
