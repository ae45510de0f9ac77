"""ONNX export with early exit inside the graph.

Each layer after the first sits inside an ONNX ``If`` that runs it only while some token is still
running; once every token has halted, the remaining ``If`` nodes take their empty branch. The
threshold is a graph input (``act_threshold``, optional: it defaults to the trained value), so it
is set per call. With compaction ("auto", the default, or "on") a running layer also chooses in
the graph between the dense step and the compacted one, which computes only the rows of tokens
still running (``ponder.model.compacted_step``), by the optional input ``compaction_cutoff``.
Two more optional inputs let a runtime batch requests, each row getting its unbatched answer: ``row_threshold``
(``[batch]``, each row's threshold) and ``row_lengths`` (``[batch]``, right padding that starts halted); the
decode graph takes ``row_threshold`` and halts new tokens whose ``attention_mask`` is 0 (metadata ``batching``).
The graph is assembled from small traced pieces (``ponder.graph``). Before anything is written
the export is checked: ``onnx.checker`` with ``full_check``, and ONNX Runtime against PyTorch at
thresholds {0.5, 0.9, 0.99, 1.0} and, with compaction, at cutoffs {default, 0.0, 1.0} (logits
within 1e-4, the same layer counts and token depths).

Foldable norms (``ponder.contracts.norms.FoldableNorm``: DyT/ADyT, and any plugin's norm that declares it) are
folded for inference: their per-channel scale and shift move into the next linear layer, so a DyT layer costs a
multiply and a tanh in the graph (ADyT's alpha is the one its frozen gradient norm gives, as in eval).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ponder import __version__
from ponder.contracts.norms import fold_into
from ponder.errors import PonderError
from ponder.limits import DEFAULT_OPSET, MIN_OPSET
from ponder.model import COMPACTION_MODES, PonderLM

CHECK_THRESHOLDS = (0.5, 0.9, 0.99, 1.0)
# what a runtime may rely on to batch requests (docs/export.md, "Batching"); models exported before lack the key
DECODE_BATCHING = {"batching": {"row_threshold": True, "padding_halts": True}}
LOGITS_TOLERANCE = 1e-4


class ExportError(PonderError):
    """The model could not be exported, or the exported graph disagrees with PyTorch."""


def fold_norms(model: PonderLM) -> PonderLM:
    """A copy of ``model`` with the affine of every foldable norm (``ponder.contracts.norms.FoldableNorm``: DyT,
    ADyT, and any third-party norm that declares it) folded into the linear layer the norm feeds, and the
    embedding's learnable scale (if any) folded into its table."""
    model = copy.deepcopy(model).eval()
    model.embed = model.embed.folded()
    for block in model.blocks:
        block.norm_attn, block.attn.qkv = fold_into(block.norm_attn, block.attn.qkv)
        block.norm_ffn, block.mlp[0] = fold_into(block.norm_ffn, block.mlp[0])
    model.norm_final, model.head = fold_into(model.norm_final, model.head)
    return model


@dataclass
class ExportReport:
    """What an export wrote and what its check measured."""

    path: Path
    opset: int
    checks: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    # the batching inputs' runs (a threshold per row, padded rows), of both graphs ("graph": "scoring" | "decode")
    batched_checks: list[dict[str, Any]] = field(default_factory=list)
    precision: str = "fp32"
    # a low-precision export's quality bound against its float32 graph, per graph and threshold (ponder.precision)
    quality: list[dict[str, Any]] = field(default_factory=list)


def _describe(model: PonderLM) -> str:
    return f"norm {model.norm_spec.name!r}, halting {model.halting_spec.name!r}"


def _finish(path: Path, metadata: dict[str, Any]) -> None:
    """Add the metadata (the optional inputs' defaults are initializers already: ``ponder.graph``)."""
    import onnx

    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def session(path: str | Path, threads: int | None = None, spin: bool = True) -> Any:
    """An ONNX Runtime session on the CPU for an exported model. ``spin=False`` stops its threads
    from busy-waiting after a call: needed to time several sessions interleaved fairly."""
    from ponder.onnx_runtime import open_session

    return open_session(path, threads or torch.get_num_threads(), spinning=spin)


def check_parity(model: PonderLM, path: Path, samples: list[Tensor], thresholds: tuple[float, ...] = CHECK_THRESHOLDS,
                 cutoffs: tuple[float | None, ...] = (None,)) -> list[dict[str, Any]]:
    """ONNX Runtime against PyTorch on ``samples`` at each threshold (and, for a compacting graph,
    each ``compaction_cutoff``: 0.0 forces the dense step, 1.0 the compacted one); PyTorch runs the
    same steps. Raises ExportError on a mismatch."""
    import numpy as np

    sess = session(path)
    checks = []
    saved = model.compaction, model.compaction_cutoff
    try:
        for ids in samples:
            for cutoff in cutoffs:
                model.compaction, model.compaction_cutoff = ("off", saved[1]) if cutoff is None else ("auto", cutoff)
                for threshold in thresholds:
                    with torch.no_grad():
                        ref = model(ids, threshold=threshold)
                    feed = {"input_ids": ids.numpy(), "act_threshold": np.array(threshold, dtype=np.float32)}
                    if cutoff is not None:
                        feed["compaction_cutoff"] = np.array(cutoff, dtype=np.float32)
                    logits, layers, depth = sess.run(None, feed)
                    diff = float(np.abs(logits - ref.logits.numpy()).max())
                    check = {"batched": False, "shape": list(ids.shape), "threshold": threshold,
                             "compaction_cutoff": cutoff,
                             "max_logit_diff": diff, "layers_executed": int(layers),
                             "torch_layers_executed": ref.layers_executed,
                             "depth_equal": bool((depth == ref.depth.numpy()).all())}
                    checks.append(check)
                    if (diff > LOGITS_TOLERANCE or check["layers_executed"] != ref.layers_executed
                            or not check["depth_equal"]):
                        raise ExportError(f"the exported graph disagrees with PyTorch ({_describe(model)}): {check}")
                if ids is samples[0]:  # once per cutoff: padded rows, each its own threshold
                    checks.append(_batched_run(model, sess, ids, cutoff, thresholds))
    finally:
        model.compaction, model.compaction_cutoff = saved
    return checks


def batch_plan(ids: Tensor, thresholds: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """A check's per-row thresholds (``thresholds`` in turn) and row lengths (each row shorter by some padding)."""
    b, t = ids.shape
    return (torch.tensor([thresholds[i % len(thresholds)] for i in range(b)], dtype=torch.float32),
            torch.tensor([max(1, t - 1 - 2 * i) for i in range(b)], dtype=torch.int64))


def _batched_run(model: PonderLM, sess: Any, ids: Tensor, cutoff: float | None,
                 thresholds: tuple[float, ...]) -> dict[str, Any]:
    """The batching inputs: ``row_threshold`` and ``row_lengths`` (right padding) against PyTorch's forward with
    the same per-row thresholds and lengths (logits of the real tokens, every token depth, layers executed)."""
    import numpy as np

    row_threshold, lengths = batch_plan(ids, thresholds)
    with torch.no_grad():
        ref = model(ids, threshold=row_threshold, lengths=lengths)
    feed = {"input_ids": ids.numpy(), "row_threshold": row_threshold.numpy(), "row_lengths": lengths.numpy()}
    if cutoff is not None:
        feed["compaction_cutoff"] = np.array(cutoff, dtype=np.float32)
    logits, layers, depth = sess.run(None, feed)
    real = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).numpy()
    diff = float(np.abs(logits - ref.logits.numpy())[real].max())
    check = {"graph": "scoring", "batched": True, "shape": list(ids.shape), "threshold": row_threshold.tolist(),
             "row_lengths": lengths.tolist(), "compaction_cutoff": cutoff, "max_logit_diff": diff,
             "layers_executed": int(layers), "torch_layers_executed": ref.layers_executed,
             "depth_equal": bool((depth == ref.depth.numpy()).all())}
    if diff > LOGITS_TOLERANCE or check["layers_executed"] != ref.layers_executed or not check["depth_equal"]:
        raise ExportError(f"the exported graph's batching inputs disagree with PyTorch ({_describe(model)}): {check}")
    return check


def check_decode(model: PonderLM, path: Path, samples: list[Tensor], thresholds: tuple[float, ...] = CHECK_THRESHOLDS,
                 cutoffs: tuple[float | None, ...] = (None,)) -> list[dict[str, Any]]:
    """The decode graph at ``path`` against ``ponder.decode.decode_step``: a prefill of each sample's first half,
    then one token per step through the cache (every row at once), at each threshold and, for a compacting graph,
    each ``compaction_cutoff`` (0.0: the prefill dense, 1.0: compacted wherever a token has halted). Raises
    ExportError on a mismatch of logits (beyond LOGITS_TOLERANCE), token depths or layers executed."""
    from ponder.decode_graph import cache_names

    sess = session(path)
    names = [o.name for o in sess.get_outputs()]
    past_names, present_names = cache_names(model.cfg.n_layers)
    checks = []
    saved = model.compaction
    try:
        for ids, cutoff, threshold in ((i, c, t) for i in samples for c in cutoffs for t in thresholds):
            model.compaction = "off" if cutoff is None else "auto"
            checks += _decode_run(model, sess, names, past_names, present_names, ids, cutoff, threshold)
            if threshold == thresholds[-1] and ids is samples[0]:  # once per cutoff: left-padded, a threshold each
                row_threshold, lengths = batch_plan(ids, thresholds)
                checks += _decode_run(model, sess, names, past_names, present_names, ids, cutoff, row_threshold,
                                      pads=ids.shape[1] - lengths)
    finally:
        model.compaction = saved
    return checks


def _decode_run(model: PonderLM, sess: Any, names: list[str], past_names: list[str], present_names: list[str],
                ids: Tensor, cutoff: float | None, threshold: float | Tensor,
                pads: Tensor | None = None) -> list[dict[str, Any]]:
    """``threshold`` a tensor: one per row (``row_threshold``); ``pads``: the first ``pads[i]`` tokens of row ``i``
    are left padding (``attention_mask`` 0)."""
    import numpy as np

    from ponder.decode import decode_step

    cfg = model.cfg
    b, t = ids.shape
    cut = max(1, t // 2)
    past, checks = None, []
    cache = {n: np.zeros((b, cfg.n_heads, 0, cfg.d_model // cfg.n_heads), np.float32) for n in past_names}
    mask = torch.ones((b, t), dtype=torch.int64)
    if pads is not None:
        mask = (torch.arange(t)[None, :] >= pads.clamp(max=cut - 1)[:, None]).to(torch.int64)  # a real token each
    batched = isinstance(threshold, Tensor)
    for start, end in [(0, cut), *((i, i + 1) for i in range(cut, min(t, cut + 3)))]:
        new = ids[:, start:end]
        ref = decode_step(model, new, past, mask[:, :end], threshold=threshold, compaction_cutoff=cutoff)
        past = ref.present
        feed = {"input_ids": new.numpy(), "attention_mask": mask[:, :end].numpy(), **cache}
        feed.update({"row_threshold": threshold.numpy()} if batched else
                    {"act_threshold": np.array(threshold, dtype=np.float32)})
        if cutoff is not None:
            feed["compaction_cutoff"] = np.array(cutoff, dtype=np.float32)
        out = dict(zip(names, sess.run(None, feed), strict=True))
        cache = {p: out[q] for p, q in zip(past_names, present_names, strict=True)}
        diff = float(np.abs(out["logits"] - ref.logits.numpy()).max())
        check = {"graph": "decode", "batched": batched, "shape": list(new.shape), "past": start,
                 "threshold": threshold.tolist() if batched else threshold,
                 "compaction_cutoff": cutoff, "max_logit_diff": diff, "layers_executed": int(out["layers_executed"]),
                 "torch_layers_executed": ref.layers_executed,
                 "depth_equal": bool((out["token_depth"] == ref.depth.numpy()).all())}
        checks.append(check)
        if diff > LOGITS_TOLERANCE or check["layers_executed"] != ref.layers_executed or not check["depth_equal"]:
            raise ExportError(f"the decode graph disagrees with PyTorch ({_describe(model)}): {check}")
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


def opset_range() -> tuple[int, int]:
    """The opsets ponder exports: from the one its graph needs to the newest the installed onnx knows."""
    import onnx

    return MIN_OPSET, onnx.defs.onnx_opset_version()


def check_opset(opset: int) -> None:
    low, high = opset_range()
    if not low <= opset <= high:
        raise ExportError(f"--opset {opset} is not supported: ponder exports opsets {low} to {high} (its graph needs "
                          f"opset {low} or later; the installed onnx knows opsets up to {high}); the default is "
                          f"{DEFAULT_OPSET}")


def check_output(path: str | Path) -> None:
    """An ExportError unless a model can be written to ``path`` (a file; its folder may still be missing)."""
    from ponder.checkpoint import folder_problem

    path = Path(path)
    if path.is_dir():
        raise ExportError(f"cannot create {str(path)!r}: it is a folder; give a file name, e.g. "
                          f"{str(path / 'model.onnx')!r}")
    problem = folder_problem(path.parent)
    if problem:
        raise ExportError(f"cannot create {str(path)!r}: {str(problem[0])!r} {problem[1]}")


def _check_compaction(compaction: str) -> None:
    if compaction not in COMPACTION_MODES:
        raise ExportError(f"compaction must be one of {', '.join(COMPACTION_MODES)}, got {compaction!r}")


def _check_precision(precision: str) -> None:
    from ponder.precision import check_precision

    try:
        check_precision(precision)
    except ValueError as exc:
        raise ExportError(str(exc)) from None


def compaction_cutoff(model: PonderLM, compaction: str) -> float | None:
    """The graph's default ``compaction_cutoff``: none without compaction, 1.0 (always) for "on",
    the model's measured cutoff for "auto"."""
    _check_compaction(compaction)
    return {"off": None, "on": 1.0, "auto": model.compaction_cutoff}[compaction]


def export_model(model: PonderLM, path: str | Path, *, metadata: dict[str, Any] | None = None,
                 opset: int = DEFAULT_OPSET, check: bool = True, fold: bool = True, unrolled: bool = False,
                 samples: list[Tensor] | None = None, compaction: str = "auto", decode: bool = True,
                 precision: str = "fp32", quality_samples: list[Tensor] | None = None) -> ExportReport:
    """Export ``model`` to ``path`` (checked, then moved into place: no partial file on failure).

    ``compaction`` "on" or "auto" adds the compacted layer step (running tokens only) and the
    optional input ``compaction_cutoff`` (default 1.0 for "on", the measured cutoff for "auto").
    ``decode`` also writes the decode graph (generation through a KV cache, ``ponder.graph.build_decode``)
    beside it (``ponder.model_repository.decode_path``), checked against ``ponder.decode.decode_step``.
    ``precision`` "bf16" or "int8" lowers both graphs after the float32 check and holds them to the quality bound
    of ``ponder.precision`` on ``quality_samples`` (default: ``samples``), always, even without ``check``."""
    from ponder.model_repository import decode_path

    _check_precision(precision)

    started = time.perf_counter()
    path = Path(path)
    model = model.cpu().eval()
    compaction = "off" if unrolled else compaction
    decode = decode and not unrolled  # the unrolled graph is a benchmark's baseline, not a model to serve
    cutoff = compaction_cutoff(model, compaction)
    check_opset(opset)
    check_output(path)
    _writable(path.parent)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".ponder-export-") as tmp:
        staged = Path(tmp) / "model.onnx"
        try:
            import onnx

            from ponder.graph import build

            folded = fold_norms(model) if fold else copy.deepcopy(model).eval()
            onnx.save(build(folded, compaction, cutoff, opset, unrolled=unrolled), str(staged))
            if decode:
                from ponder.decode_graph import build_decode

                onnx.save(build_decode(folded, opset, cutoff), str(decode_path(staged)))
        except Exception as exc:  # the exporter's own errors are long; keep the cause, name the plugins
            summary = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"could not export the model ({_describe(model)}): {type(exc).__name__}: "
                              f"{summary[:300]}") from exc
        compaction_meta = {"compaction": compaction, "compaction_cutoff": "" if cutoff is None else str(cutoff)}
        decode_meta = {"decode_graph": decode_path(path).name} if decode else {}
        batching = {"batching": {"row_threshold": True, "row_lengths": True}}
        _finish(staged, {**_metadata(model), **compaction_meta, **decode_meta, **batching, "precision": "fp32",
                         **(metadata or {})})
        samples = samples or sample_inputs(model)
        cutoffs = (None,) if cutoff is None else tuple(dict.fromkeys((cutoff, 0.0, 1.0)))
        checks = check_parity(model, staged, samples, cutoffs=cutoffs) if check and not unrolled else []
        if decode:
            _finish(decode_path(staged), {**_metadata(model), "graph": "decode", **DECODE_BATCHING,
                                          "precision": "fp32", **(metadata or {})})
            if check:
                checks += check_decode(model, decode_path(staged), samples, cutoffs=cutoffs)
        if precision == "fp32":
            quality = []
        else:
            from ponder.precision import QualityBoundError, lower_checked

            try:
                quality = lower_checked(model, staged, decode_path(staged) if decode else None, precision,
                                        quality_samples or samples)
            except QualityBoundError as exc:
                raise ExportError(str(exc)) from None
        if decode:
            os.replace(decode_path(staged), decode_path(path))
        os.replace(staged, path)
    return ExportReport(path, opset, [c for c in checks if not c["batched"]], time.perf_counter() - started,
                        [c for c in checks if c["batched"]], precision, quality)


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
    """Create ``folder`` to write into, or an ExportError saying why it cannot be."""
    from ponder.checkpoint import folder_problem

    problem = folder_problem(folder)
    if problem:
        raise ExportError(f"cannot write into {str(folder)!r}: {str(problem[0])!r} {problem[1]}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create {str(folder)!r}: {exc.strerror or exc}") from None


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
                      check: bool = True, fold: bool = True, compaction: str = "auto",
                      decode: bool = True, precision: str = "fp32") -> ExportReport:
    """Export a checkpoint to a lone file (``output``) or into a model repository laid out like
    Triton's: ``repository/name/version/model.onnx`` with a ``config.json`` beside it."""
    from ponder.checkpoint import load_model, resolve
    from ponder.data import prepare_data
    from ponder.model_repository import (
        CONFIG_FILE,
        MODEL_FILE,
        STAGING_PREFIX,
        check_model_name,
        check_version,
        lone_config_path,
        next_version,
        version_folder,
    )

    if (output is None) == (repository is None):
        raise ExportError("give either an output file (-o FILE) or --repository ROOT --name NAME")
    _check_compaction(compaction)  # before the slow part
    check_opset(opset)
    _check_precision(precision)
    if output is not None:
        check_output(output)
    else:  # the rules `ponder serve` reads the repository by: a name it would skip is refused here
        check_model_name(name, "--name")
        if version is not None:
            version = check_version(version, "--version")
    ckpt = resolve(checkpoint)
    model, tokenizer, run = load_model(ckpt)
    try:
        corpus_ids = prepare_data(run.data, tokenizer).splits["valid"]
    except PonderError:
        corpus_ids = None  # the training data is not here: check on random tokens instead
    samples = sample_inputs(model, corpus_ids)
    from ponder.precision import quality_inputs

    lowering = {"precision": precision, "quality_samples": quality_inputs(model, corpus_ids)}
    tokenizer_json = tokenizer.to_json()
    metadata = {"tokenizer": {"kind": tokenizer_json["kind"], "vocab_size": tokenizer.vocab_size},
                "source_checkpoint": str(ckpt), "source_weights_sha256": weights_digest(ckpt)}
    if output is not None:
        report = export_model(model, output, metadata=metadata, opset=opset, check=check, fold=fold, samples=samples,
                              compaction=compaction, decode=decode, **lowering)
        if tokenizer_json["kind"] != "byte":
            config_path = lone_config_path(output)
            config_path.write_text(json.dumps(_serving_config(model, tokenizer_json, name=Path(output).stem), indent=1))
        return report
    root = Path(repository) / name
    _writable(root)
    if version is None:
        version = next_version(root)
    final = version_folder(repository, name, version)
    if final.exists():
        raise ExportError(f"{str(final)!r} already exists: choose another --version")
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f"{STAGING_PREFIX}{version}-"))
    try:
        report = export_model(model, staging / MODEL_FILE, metadata=metadata, opset=opset, check=check, fold=fold,
                              samples=samples, compaction=compaction, decode=decode, **lowering)
        config = _serving_config(model, tokenizer_json, name=name, version=version)
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report.path = final / MODEL_FILE
    return report


def _serving_config(model: PonderLM, tokenizer: dict[str, Any], *, name: str, version: int | None = None) -> dict:
    return {
        "format": "ponder-onnx", "ponder_version": __version__, "name": name, "version": version,
        "tokenizer": tokenizer, "n_layers": model.cfg.n_layers, "max_seq_len": model.cfg.max_seq_len,
        "vocab_size": model.cfg.vocab_size,
        "defaults": {"act_threshold": model.dials.value("act_threshold")},
        "inputs": {"input_ids": "int64 [batch, seq], seq <= max_seq_len",
                   "act_threshold": "float32 scalar in (0, 1], optional (1.0: every layer)",
                   "row_threshold": "float32 [batch], optional: each row's threshold (<= 0: act_threshold)",
                   "row_lengths": "int64 [batch], optional: right padding at positions >= length (default: none)"},
        "outputs": {"logits": "float32 [batch, seq, vocab]", "layers_executed": "int64 scalar: layers actually run",
                    "token_depth": "int64 [batch, seq]: layers each token ran"},
        "norm": model.norm_spec.to_json(), "halting": model.halting_spec.to_json(),
    }
