"""Checkpoints without pickle: JSON for structure, safetensors for tensors, written atomically.

A run folder holds ``checkpoints/step-NNNNNNNN/`` folders and a ``latest`` file naming the newest:

    config.json                 format tag, ponder version, the run config, the tokenizer
    model.safetensors           the model's weights
    trainer_state.json          step, dials, optimizer and controller state (tensors by reference)
    trainer_state.safetensors   the tensors trainer_state.json refers to (optimizer moments, RNG state)

A checkpoint is written into a hidden temporary folder and renamed into place, and ``latest`` is
replaced atomically after it, so a kill mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ponder import __version__
from ponder.config import parse_config
from ponder.data import tokenizer_from_json
from ponder.errors import CheckpointError, ConfigError
from ponder.model import build_model

FORMAT = "ponder-checkpoint"
FORMAT_VERSION = 1
CONFIG, MODEL, STATE_JSON, STATE_TENSORS = (
    "config.json", "model.safetensors", "trainer_state.json", "trainer_state.safetensors")
STEP_NAME = re.compile(r"step-\d{8}")  # a checkpoint folder's name; anything else in checkpoints/ is left alone


# -- nested state <-> JSON + tensors ---------------------------------------------------------------

def to_tree(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """JSON-able form of ``obj``; tensors go into ``tensors`` and are replaced by references."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: to_tree(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
        return {"__items__": [[to_tree(k, tensors, f"{prefix}.k{i}"), to_tree(v, tensors, f"{prefix}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [to_tree(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [to_tree(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot save a {type(obj).__name__} at {prefix!r} (only tensors, numbers, strings, "
                          "lists, tuples and dicts)")


def from_tree(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            try:
                return tensors[tree["__tensor__"]]
            except KeyError:
                raise CheckpointError(f"trainer state refers to a missing tensor {tree['__tensor__']!r}") from None
        if "__items__" in tree:
            return {from_tree(k, tensors): from_tree(v, tensors) for k, v in tree["__items__"]}
        if "__tuple__" in tree:
            return tuple(from_tree(v, tensors) for v in tree["__tuple__"])
        return {k: from_tree(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [from_tree(v, tensors) for v in tree]
    return tree


# -- writing -----------------------------------------------------------------------------------------

def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(run_dir: str | Path, step: int, *, config: dict[str, Any], model_state: dict[str, torch.Tensor],
                    trainer_state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``run_dir/checkpoints/step-{step}`` atomically, point ``latest`` at it, keep the newest ``keep``."""
    root = Path(run_dir)
    ckpt_root = root / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:08d}-", dir=ckpt_root))
    try:
        _write_json(tmp / CONFIG, {"format": FORMAT, "format_version": FORMAT_VERSION,
                                   "ponder_version": __version__, **config})
        save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(tmp / MODEL))
        tensors: dict[str, torch.Tensor] = {}
        tree = to_tree(trainer_state, tensors, "state")
        save_file(tensors, str(tmp / STATE_TENSORS))
        _write_json(tmp / STATE_JSON, tree)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, root / "latest")
    for old in checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def folder_problem(folder: str | Path) -> tuple[Path, str] | None:
    """``(path, what is wrong with it)`` when ``folder`` cannot be written into or made, e.g. ``(somefile, "is a
    file, not a folder")``; None when it can. Creates nothing: the nearest folder that exists is tried with a
    temporary folder, removed again."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return existing, "is a file, not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".ponder-probe-", dir=existing))
    except OSError as exc:
        return existing, f"is not writable ({exc.strerror or exc})"
    return None


# -- reading ----------------------------------------------------------------------------------------

def resolve(path: str | Path) -> Path:
    """A checkpoint folder from itself or from a run folder (its ``latest``)."""
    p = Path(path)
    if (p / CONFIG).is_file():
        return p
    latest = p / "latest"
    if latest.is_file():
        target = p / "checkpoints" / latest.read_text().strip()
        if (target / CONFIG).is_file():
            return target
        raise CheckpointError(f"{str(p)!r}: 'latest' names {target.name!r}, which is missing or incomplete")
    if not p.exists():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    raise CheckpointError(f"{str(p)!r} is not a ponder checkpoint or run folder (no {CONFIG}, no 'latest')")


def checkpoints(run_dir: str | Path) -> list[Path]:
    """A run's checkpoint folders (``checkpoints/step-NNNNNNNN``), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if STEP_NAME.fullmatch(p.name) and p.is_dir())


def run_folder(ckpt: Path) -> Path:
    """The run folder a checkpoint belongs to (the checkpoint itself when it stands alone)."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt


def read_config(ckpt: Path) -> dict[str, Any]:
    try:
        data = json.loads((ckpt / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{str(ckpt / CONFIG)!r} is unreadable: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{str(ckpt)!r} is not a ponder checkpoint (its {CONFIG} has no format "
                              f"{FORMAT!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{str(ckpt)!r} has checkpoint format {data.get('format_version')!r}; "
                              f"this ponder reads {FORMAT_VERSION}")
    return data


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{str(path)!r} is corrupt: {exc}") from None


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    try:
        tree = json.loads((ckpt / STATE_JSON).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{str(ckpt / STATE_JSON)!r} is unreadable: {exc}") from None
    return from_tree(tree, read_tensors(ckpt / STATE_TENSORS))


def read_checkpoint(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """``(config, trainer state, model weights)`` of a checkpoint, every file read in full: a CheckpointError
    names the first file that is missing or damaged."""
    saved = read_config(ckpt)
    for key in ("run", "tokenizer"):
        if key not in saved:
            raise CheckpointError(f"{str(ckpt / CONFIG)!r} has no {key!r}")
    return saved, read_trainer_state(ckpt), read_tensors(ckpt / MODEL)


def read_for_resume(run_dir: str | Path) -> tuple[Path, tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]],
                                                  list[str]]:
    """``(checkpoint, read_checkpoint(checkpoint), notes)`` for resuming the run in ``run_dir``: its latest checkpoint.

    When the latest cannot be read the error names it, says what is wrong and names the newest intact earlier
    checkpoint, which a resume takes once the damaged one is moved out of ``checkpoints/`` (nothing is deleted
    here: the damaged files are the user's to inspect). ``latest`` naming a checkpoint that is gone resumes from
    the newest intact one, with a note."""
    root = Path(run_dir)
    latest = root / "latest"
    if not latest.is_file():
        ckpt = resolve(root)  # no run here: resolve says so
        return ckpt, read_checkpoint(ckpt), []
    named = root / "checkpoints" / latest.read_text().strip()
    if not named.exists():
        earlier = _newest_intact(root, before=None)
        if earlier is None:
            raise CheckpointError(f"{str(root)!r}: 'latest' names {named.name!r}, which is missing, and no other "
                                  f"intact checkpoint is left in {str(root / 'checkpoints')!r} to resume from")
        ckpt, parts = earlier
        return ckpt, parts, [f"'latest' names {named.name}, which is not in {root / 'checkpoints'}: resuming from "
                             f"{ckpt.name}, the newest intact checkpoint"]
    try:
        return named, read_checkpoint(named), []
    except CheckpointError as exc:
        damage = exc
    earlier = _newest_intact(root, before=named)
    if earlier is None:
        raise CheckpointError(f"cannot resume from the latest checkpoint {str(named)!r}: {damage}; no earlier intact "
                              f"checkpoint is left in {str(root / 'checkpoints')!r}, so the run must start over in "
                              "another --out") from None
    raise CheckpointError(f"cannot resume from the latest checkpoint: {damage}; the earlier checkpoint "
                          f"{earlier[0].name} is intact: move {named} out of {root / 'checkpoints'} (or delete it) "
                          f"and resume again to continue from {earlier[0].name}") from None


def _newest_intact(root: Path, before: Path | None) -> tuple[Path, Any] | None:
    """The newest checkpoint of ``root`` older than ``before`` that reads in full, with what it holds."""
    for ckpt in reversed(checkpoints(root)):
        if before is not None and ckpt.name >= before.name:
            continue
        try:
            return ckpt, read_checkpoint(ckpt)
        except CheckpointError:
            continue
    return None


def load_model(path: str | Path, device: str = "cpu") -> tuple[Any, Any, Any]:
    """``(model, tokenizer, run_config)`` from a checkpoint or run folder, in eval mode on ``device``."""
    ckpt = resolve(path)
    saved = read_config(ckpt)
    try:
        run = parse_config(saved["run"])
        tokenizer = tokenizer_from_json(saved["tokenizer"])
    except (KeyError, ConfigError) as exc:
        raise CheckpointError(f"{str(ckpt)!r} has an unusable config: {exc}") from None
    model = build_model(run, tokenizer.vocab_size)
    state = read_trainer_state(ckpt) if (ckpt / STATE_JSON).is_file() else {}
    try:
        model.load_state_dict(read_tensors(ckpt / MODEL))
        if "dials" in state:
            model.dials.load_state_dict(state["dials"])
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{str(ckpt)!r}: the weights do not fit the model its config describes: {exc}") from None
    return model.to(device).eval(), tokenizer, run
