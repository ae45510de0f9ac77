"""``ponder inspect`` and ``ponder run``: an exported model in this process, on ONNX Runtime: what its graphs take
and give, and generation through its KV cache."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ponder.generation import add_sampling_arguments, sampling_from_args
from ponder.limits import THRESHOLD_RANGE


def add_parsers(commands: Any) -> None:
    """The parsers of ``ponder inspect`` and ``ponder run`` (building them imports nothing heavy)."""
    ins = commands.add_parser("inspect", help="print an exported model's metadata, inputs and outputs",
                              description="Print the ponder metadata, inputs and outputs of an exported model.")
    ins.add_argument("model", help="a model.onnx written by ponder export, a version folder (its model.onnx), a "
                                   "model folder (its newest version) or a repository holding one model")
    ins.add_argument("--json", action="store_true", help="print JSON")
    ins.set_defaults(handler=inspect)

    rn = commands.add_parser("run", help="generate from an exported model with ONNX Runtime",
                             description="Generate in-process with ONNX Runtime through the model's KV cache "
                                         "(decode.onnx): the next tokens after --text, with each token's depth and "
                                         "latency. Greedy unless --temperature is above 0.")
    rn.add_argument("model", help="a model.onnx written by ponder export, or a version or model folder")
    rn.add_argument("--text", required=True, help="the prompt")
    rn.add_argument("--threshold", "-t", type=float,
                    help=f"act_threshold in {THRESHOLD_RANGE} (default: the trained one)")
    add_sampling_arguments(rn, "--tokens")
    rn.set_defaults(handler=run)


def inspect(args: argparse.Namespace) -> int:
    from ponder.model_repository import model_file
    from ponder.serve.engine import read_metadata

    path = model_file(args.model)
    meta = read_metadata(path)
    decode = meta.get("decode_graph")
    decode_meta = read_metadata(path.parent / decode) if isinstance(decode, str) and (path.parent / decode).is_file() \
        else None
    if args.json:
        if decode_meta is not None:
            meta["decode"] = {"inputs": decode_meta["inputs"], "outputs": decode_meta["outputs"]}
        print(json.dumps(meta, indent=2))
        return 0
    for key, value in meta.items():
        if key in ("inputs", "outputs"):
            continue
        print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    for key in ("inputs", "outputs"):
        print(f"{key}:")
        for name, shape in meta[key]:
            print(f"  {name}: {shape}")
    if decode_meta is not None:
        print(f"decode graph ({decode}): generation through a KV cache, one layer's cache per past/present pair")
        for key in ("inputs", "outputs"):
            print(f"  {key}:")
            for name, shape in _per_layer(decode_meta[key]):
                print(f"    {name}: {shape}")
    elif decode:
        print(f"decode graph: {decode} is missing beside the model")
    return 0


def _per_layer(tensors: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``past_key_values.0.key`` ... ``past_key_values.5.key`` (one shape) shown as one line ``...{0..5}.key``."""
    import re

    lines: dict[tuple[str, str], list[int] | None] = {}  # (name or pattern, shape) -> layers, in order of appearance
    for name, shape in tensors:
        match = re.fullmatch(r"(.*?)\.(\d+)\.(key|value)", name)
        if match is None:
            lines[(name, shape)] = None
        else:
            layers = lines.setdefault((f"{match.group(1)}.{{}}.{match.group(3)}", shape), [])
            layers.append(int(match.group(2)))  # type: ignore[union-attr]
    return [(name if layers is None else name.format(f"{{{min(layers)}..{max(layers)}}}"), shape)
            for (name, shape), layers in lines.items()]


def run(args: argparse.Namespace) -> int:
    from ponder.model_repository import model_file
    from ponder.serve.engine import Engine

    sampling = sampling_from_args(args)
    engine = Engine(model_file(args.model))
    threshold = engine.check_threshold(args.threshold)
    out = engine.generate(args.text, sampling, threshold)
    steps = out["steps"]
    depths = [s["token_depth"] for s in steps]
    first, rest = steps[0]["compute_ms"], sorted(s["compute_ms"] for s in steps[1:])
    print(f"{args.text}\u2192{out['text']}")
    print(f"threshold {threshold:g}: {len(steps)} tokens ({out['finish_reason']}); depth per token {depths} (mean "
          f"{sum(depths) / len(depths):.2f} of {engine.n_layers}); first token {first:.2f} ms"
          + (f", then p50 {rest[len(rest) // 2]:.2f} ms per token ({1e3 * len(rest) / sum(rest):.0f} tokens/s)"
             if rest else ""))
    return 0
