"""``ponder tokenize``: text into the token ids a model reads, and back, with the tokenizer it was trained with."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ponder.errors import PonderError


def add_parser(commands: Any) -> None:
    """``ponder tokenize``'s parser (building it imports nothing heavy)."""
    tk = commands.add_parser("tokenize", help="turn text into a model's token ids, or ids back into text",
                             description="Turn text into the token ids a model reads, with the tokenizer it was "
                                         "trained with (bytes, or the word vocabulary its run built), or with "
                                         "--decode ids back into text. The ids go to `ponder client infer --ids`. "
                                         "A word-level model reads whitespace-separated words, ends every line "
                                         "with <eos> and reads unknown words as <unk>.")
    tk.add_argument("model", metavar="MODEL_OR_RUN",
                    help="an exported model (a model.onnx, a version or model folder), or a checkpoint or run folder")
    what = tk.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="the text to turn into ids")
    what.add_argument("--decode", metavar="IDS", help="token ids separated by spaces or commas, to turn into text")
    tk.add_argument("--json", action="store_true",
                    help="print JSON: the tokenizer, the vocabulary size and the ids (or the text)")
    tk.set_defaults(handler=run)


def tokenizer_spec(arg: str) -> tuple[dict[str, Any], str]:
    """``(tokenizer description, where it was found)`` of a checkpoint or run folder or an exported model: the
    checkpoint's config.json, or the config.json beside model.onnx, or the model's own metadata."""
    from ponder.checkpoint import CONFIG, read_config, resolve
    from ponder.model_repository import MODEL_FILE, config_paths, model_file

    path = Path(arg)
    if path.is_dir() and ((path / "latest").is_file()
                          or ((path / CONFIG).is_file() and not (path / MODEL_FILE).is_file())):
        ckpt = resolve(path)
        return read_config(ckpt).get("tokenizer") or {"kind": "byte"}, str(ckpt / CONFIG)
    model = model_file(arg)
    if not model.exists():
        raise PonderError(f"{arg!r} does not exist: give an exported model (a model.onnx, a version or model folder) "
                          "or a checkpoint or run folder")
    for candidate in config_paths(model):  # as ponder serve reads them
        if candidate.is_file():
            try:
                spec = json.loads(candidate.read_text(encoding="utf-8")).get("tokenizer")
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
                raise PonderError(f"{str(candidate)!r} is unreadable: {exc}") from None
            if spec:
                return spec, str(candidate)
    from ponder.serve.engine import read_metadata

    spec = read_metadata(model).get("tokenizer") or {"kind": "byte"}
    if spec.get("kind") != "byte" and "vocab" not in spec:
        raise PonderError(f"{str(model)!r} is a {spec.get('kind')}-level model, but no config.json with its vocabulary "
                          "lies beside it (ponder export writes one)")
    return spec, str(model)


def run(args: argparse.Namespace) -> int:
    from ponder.text import tokenizer_from_json

    spec, source = tokenizer_spec(args.model)
    tokenizer = tokenizer_from_json(spec)
    size = tokenizer.vocab_size
    if args.decode is not None:
        try:
            ids = [int(x) for x in args.decode.replace(",", " ").split()]
        except ValueError:
            raise PonderError(f"--decode takes whole numbers separated by spaces or commas, got {args.decode!r}"
                               ) from None
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            raise PonderError(f"--decode: {bad[0]} is not a token id of this model (its ids are 0..{size - 1})")
        text = tokenizer.decode(ids)
        print(json.dumps({"tokenizer": tokenizer.kind, "vocab_size": size, "ids": ids, "text": text}, indent=2)
              if args.json else text)
        return 0
    ids = [int(i) for i in tokenizer.encode(args.text)]
    unknown = ids.count(0) if tokenizer.kind == "word" else 0
    if args.json:
        print(json.dumps({"tokenizer": tokenizer.kind, "vocab_size": size, "source": source, "ids": ids,
                          "unknown": unknown}, indent=2))
    else:
        print(" ".join(map(str, ids)))
    if unknown:
        print(f"ponder: note: {unknown} of {len(ids)} tokens are <unk> (id 0): words outside the model's vocabulary",
              file=sys.stderr)
    return 0
