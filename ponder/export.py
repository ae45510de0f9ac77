"""ONNX export with early exit inside the graph.

Each layer of the exported graph sits inside a ``torch.cond`` (an ONNX ``If``) that runs it only
while some token is still running; once every token has halted, the remaining ``If`` nodes take
their empty branch. The threshold is a graph input (``act_threshold``, optional: it defaults to
the trained value), so it is set per call. Before anything is written the export is checked:
``onnx.checker`` with ``full_check``, and ONNX Runtime against PyTorch at thresholds
{0.5, 0.9, 0.99, 1.0} (logits within 1e-4, the same layer counts and token depths).

DyT/ADyT layers are folded for inference: their per-channel scale and shift move into the next
linear layer, so each costs a multiply and a tanh in the graph (ADyT's alpha is the one its
frozen gradient norm gives, as in eval).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ponder import __version__
from ponder.errors import PonderError
from ponder.model import PonderLM, attention_mask, rope_tables
from ponder.plugins.halt.rules import HaltState

CHECK_THRESHOLDS = (0.5, 0.9, 0.99, 1.0)
LOGITS_TOLERANCE = 1e-4
DEFAULT_OPSET = 18


class ExportError(PonderError):
    """The model could not be exported, or the exported graph disagrees with PyTorch."""


class ScaledTanh(nn.Module):
    """``tanh(alpha * x)``: what a DyT layer leaves in the graph once its affine is folded away."""

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.alpha * x)


def _fold_into(norm: nn.Module, linear: nn.Linear) -> tuple[nn.Module, nn.Linear]:
    """``linear(w * tanh(a x) + b) == linear'(tanh(a x))`` with ``W' = W diag(w)``, ``c' = W b + c``."""
    from ponder.plugins.norm.dyt import DynamicTanh

    if not isinstance(norm, DynamicTanh) or not norm.channels_last or norm.weight.dim() != 1:
        return norm, linear
    with torch.no_grad():
        weight = linear.weight * norm.weight[None, :]
        bias = linear.bias.clone() if linear.bias is not None else torch.zeros(linear.out_features)
        if norm.bias is not None:
            bias = bias + linear.weight @ norm.bias
        folded = nn.Linear(linear.in_features, linear.out_features, bias=True)
        folded.weight.copy_(weight)
        folded.bias.copy_(bias)
        alpha = float(norm.current_alpha().reshape(()))
    return ScaledTanh(alpha), folded


def fold_norms(model: PonderLM) -> PonderLM:
    """A copy of ``model`` with every DyT/ADyT affine folded into the linear layer it feeds."""
    model = copy.deepcopy(model).eval()
    for block in model.blocks:
        block.norm_attn, block.attn.qkv = _fold_into(block.norm_attn, block.attn.qkv)
        block.norm_ffn, block.mlp[0] = _fold_into(block.norm_ffn, block.mlp[0])
    model.norm_final, model.head = _fold_into(model.norm_final, model.head)
    return model


class EarlyExitGraph(nn.Module):
    """The exportable form of a :class:`PonderLM`: ``(input_ids, act_threshold) -> (logits,
    layers_executed, token_depth)``, each layer behind a ``torch.cond`` on "any token running".
    ``unrolled=True`` runs every layer unconditionally (the fixed-depth baseline of the benchmark)."""

    def __init__(self, model: PonderLM, *, fold: bool = True, unrolled: bool = False) -> None:
        super().__init__()
        self.model = fold_norms(model) if fold else copy.deepcopy(model).eval()
        self.unrolled = unrolled
        cfg = model.cfg
        self.head_dim = cfg.d_model // cfg.n_heads
        self.rope_base = model.dials.value("rope_base")
        self.window = model.dials["attn_window"].as_int()

    def forward(self, input_ids: Tensor, act_threshold: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        m = self.model
        t = input_ids.shape[1]
        cos, sin = rope_tables(t, self.head_dim, self.rope_base, input_ids.device)
        mask = attention_mask(t, m.cfg.n_heads, m.cfg.n_local_heads, self.window, input_ids.device)
        halting = m.halting
        st = halting.init_state(m.embed(input_ids))
        carry = (st.halted, st.cum, st.depth, st.output, st.hidden, torch.zeros((), dtype=torch.int64))
        for i, block in enumerate(m.blocks):

            def run(halted, cum, depth, output, hidden, layers, block=block, i=i):
                s = block(hidden, cos, sin, mask)
                new = halting.step(HaltState(halted, cum, depth, output, hidden, cum, cum), s, i, act_threshold)
                return new.halted, new.cum, new.depth, new.output, new.hidden, layers + 1

            def skip(halted, cum, depth, output, hidden, layers):
                return halted.clone(), cum.clone(), depth.clone(), output.clone(), hidden.clone(), layers.clone()

            carry = run(*carry) if self.unrolled else torch.cond(~carry[0].all(), run, skip, carry)
        halted, cum, depth, output, hidden, layers = carry
        return m.head(m.norm_final(output)), layers, depth.to(torch.int64)


@dataclass
class ExportReport:
    """What an export wrote and what its check measured."""

    path: Path
    opset: int
    checks: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def _describe(model: PonderLM) -> str:
    return f"norm {model.norm_spec.name!r}, halting {model.halting_spec.name!r}"


def _torch_export(graph: EarlyExitGraph, path: Path, opset: int) -> None:
    cfg = graph.model.cfg
    ids = torch.zeros((2, min(16, cfg.max_seq_len)), dtype=torch.int64)
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=2, max=max(2, cfg.max_seq_len))
    logging.disable(logging.WARNING)  # the exporter's progress chatter; real failures still raise
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, (ids, torch.tensor(0.9)), str(path),
                              input_names=["input_ids", "act_threshold"],
                              output_names=["logits", "layers_executed", "token_depth"], opset_version=opset,
                              dynamic_shapes={"input_ids": {0: batch, 1: seq}, "act_threshold": None},
                              dynamo=True, external_data=False)
    finally:
        logging.disable(logging.NOTSET)


def _finish(path: Path, model: PonderLM, metadata: dict[str, Any]) -> None:
    """Make ``act_threshold`` optional (an initializer with the trained value) and add metadata."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    default = np.array(model.dials.value("act_threshold"), dtype=np.float32)
    proto.graph.initializer.append(numpy_helper.from_array(default, "act_threshold"))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def session(path: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime session on the CPU for an exported model."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_parity(model: PonderLM, path: Path, samples: list[Tensor],
                 thresholds: tuple[float, ...] = CHECK_THRESHOLDS) -> list[dict[str, Any]]:
    """ONNX Runtime against PyTorch on ``samples`` at each threshold; raises ExportError on a mismatch."""
    import numpy as np

    sess = session(path)
    checks = []
    for ids in samples:
        for threshold in thresholds:
            with torch.no_grad():
                ref = model(ids, threshold=threshold)
            logits, layers, depth = sess.run(None, {"input_ids": ids.numpy(),
                                                    "act_threshold": np.array(threshold, dtype=np.float32)})
            diff = float(np.abs(logits - ref.logits.numpy()).max())
            check = {"shape": list(ids.shape), "threshold": threshold, "max_logit_diff": diff,
                     "layers_executed": int(layers), "torch_layers_executed": ref.layers_executed,
                     "depth_equal": bool((depth == ref.depth.numpy()).all())}
            checks.append(check)
            if diff > LOGITS_TOLERANCE or check["layers_executed"] != ref.layers_executed or not check["depth_equal"]:
                raise ExportError(f"the exported graph disagrees with PyTorch ({_describe(model)}): {check}")
    return checks


def sample_inputs(model: PonderLM, corpus_ids: Tensor | None = None) -> list[Tensor]:
    """Check inputs: real text when there is some (so tokens halt at different depths), two shapes."""
    t = min(model.cfg.max_seq_len, 48)
    gen = torch.Generator().manual_seed(0)
    if corpus_ids is not None and len(corpus_ids) > 3 * t:
        a = corpus_ids[: 2 * t].view(2, t)
        b = corpus_ids[2 * t: 2 * t + t // 2 + 1].view(1, -1)
    else:
        a = torch.randint(0, model.cfg.vocab_size, (2, t), generator=gen)
        b = torch.randint(0, model.cfg.vocab_size, (1, t // 2 + 1), generator=gen)
    return [a.long(), b.long()]


def export_model(model: PonderLM, path: str | Path, *, metadata: dict[str, Any] | None = None,
                 opset: int = DEFAULT_OPSET, check: bool = True, fold: bool = True, unrolled: bool = False,
                 samples: list[Tensor] | None = None) -> ExportReport:
    """Export ``model`` to ``path`` (checked, then moved into place: no partial file on failure)."""
    started = time.perf_counter()
    path = Path(path)
    model = model.cpu().eval()
    _writable(path.parent)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".ponder-export-") as tmp:
        staged = Path(tmp) / "model.onnx"
        try:
            _torch_export(EarlyExitGraph(model, fold=fold, unrolled=unrolled), staged, opset)
        except Exception as exc:  # the exporter's own errors are long; keep the cause, name the plugins
            summary = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"could not export the model ({_describe(model)}): {type(exc).__name__}: "
                              f"{summary[:300]}") from exc
        _finish(staged, model, {**_metadata(model), **(metadata or {})})
        checks = check_parity(model, staged, samples or sample_inputs(model)) if check and not unrolled else []
        os.replace(staged, path)
    return ExportReport(path, opset, checks, time.perf_counter() - started)


def _metadata(model: PonderLM) -> dict[str, Any]:
    import dataclasses

    return {
        "ponder_version": __version__,
        "n_layers": str(model.cfg.n_layers),
        "max_seq_len": str(model.cfg.max_seq_len),
        "vocab_size": str(model.cfg.vocab_size),
        "act_threshold": str(model.dials.value("act_threshold")),
        "norm": model.norm_spec.to_json(),
        "halting": model.halting_spec.to_json(),
        "model": dataclasses.asdict(model.cfg),
        "dials": model.dials.snapshot(),
    }


def _writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create {str(folder)!r}: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK):
        raise ExportError(f"{str(folder)!r} is not writable")


def weights_digest(ckpt: Path) -> str:
    """SHA-256 of a checkpoint's weights file: tells whether an export came from these very weights."""
    import hashlib

    from ponder.checkpoint import MODEL

    digest = hashlib.sha256()
    with open(ckpt / MODEL, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_checkpoint(checkpoint: str | Path, output: str | Path | None = None, *, repository: str | Path | None = None,
                      name: str | None = None, version: int | None = None, opset: int = DEFAULT_OPSET,
                      check: bool = True, fold: bool = True) -> ExportReport:
    """Export a checkpoint to a lone file (``output``) or into a model repository laid out like
    Triton's: ``repository/name/version/model.onnx`` with a ``config.json`` beside it."""
    from ponder.checkpoint import load_model, resolve
    from ponder.data import prepare_data

    if (output is None) == (repository is None):
        raise ExportError("give either an output file (-o FILE) or --repository ROOT --name NAME")
    ckpt = resolve(checkpoint)
    model, tokenizer, run = load_model(ckpt)
    try:
        corpus_ids = prepare_data(run.data, tokenizer).splits["valid"]
    except PonderError:
        corpus_ids = None  # the training data is not here: check on random tokens instead
    samples = sample_inputs(model, corpus_ids)
    tokenizer_json = tokenizer.to_json()
    metadata = {"tokenizer": {"kind": tokenizer_json["kind"], "vocab_size": tokenizer.vocab_size},
                "source_checkpoint": str(ckpt), "source_weights_sha256": weights_digest(ckpt)}
    if output is not None:
        report = export_model(model, output, metadata=metadata, opset=opset, check=check, fold=fold, samples=samples)
        if tokenizer_json["kind"] != "byte":
            config_path = Path(output).with_suffix(".json")
            config_path.write_text(json.dumps(_serving_config(model, tokenizer_json, name=Path(output).stem), indent=1))
        return report
    if not name or "/" in name or name.startswith("."):
        raise ExportError(f"--name must be a plain folder name, got {name!r}")
    root = Path(repository) / name
    _writable(root)
    if version is None:
        existing = [int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()]
        version = max(existing, default=0) + 1
    if version < 1:
        raise ExportError(f"--version must be >= 1, got {version}")
    final = root / str(version)
    if final.exists():
        raise ExportError(f"{str(final)!r} already exists: choose another --version")
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{version}-"))
    try:
        report = export_model(model, staging / "model.onnx", metadata=metadata, opset=opset, check=check, fold=fold,
                              samples=samples)
        config = _serving_config(model, tokenizer_json, name=name, version=version)
        (staging / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report.path = final / "model.onnx"
    return report


def _serving_config(model: PonderLM, tokenizer: dict[str, Any], *, name: str, version: int | None = None) -> dict:
    return {
        "format": "ponder-onnx", "ponder_version": __version__, "name": name, "version": version,
        "tokenizer": tokenizer, "n_layers": model.cfg.n_layers, "max_seq_len": model.cfg.max_seq_len,
        "vocab_size": model.cfg.vocab_size,
        "defaults": {"act_threshold": model.dials.value("act_threshold")},
        "inputs": {"input_ids": "int64 [batch, seq], seq <= max_seq_len",
                   "act_threshold": "float32 scalar in (0, 1], optional (1.0: every layer)"},
        "outputs": {"logits": "float32 [batch, seq, vocab]", "layers_executed": "int64 scalar: layers actually run",
                    "token_depth": "int64 [batch, seq]: layers each token ran"},
        "norm": model.norm_spec.to_json(), "halting": model.halting_spec.to_json(),
    }
