"""Text and tokenizers without torch: what serving, ``ponder tokenize`` and ``ponder bench`` read text with.

Nothing is downloaded: the embedded corpus is the English documentation that every Python install ships
(``pydoc_data.topics``). Here a tokenizer's ``encode`` gives a numpy int64 array; ``ponder.data`` builds its
tokenizers on these and gives torch tensors, for training.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import Any

import numpy as np

from ponder.errors import DataError


class ByteTokenizer:
    """UTF-8 bytes as tokens: 256 ids, no vocabulary to build or ship."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> Any:
        """The text's token ids (numpy int64 here; a torch tensor from ``ponder.data.ByteTokenizer``)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def to_json(self) -> dict[str, Any]:
        return {"kind": "byte"}


class WordTokenizer:
    """Whitespace-separated words, one ``<eos>`` per line, ``<unk>`` for words outside the vocabulary
    (WikiText-2 style). The vocabulary is built from the training split, most frequent first."""

    kind = "word"
    UNK, EOS = "<unk>", "<eos>"

    def __init__(self, vocab: list[str]) -> None:
        if vocab[:2] != [self.UNK, self.EOS]:
            raise ValueError("a word vocabulary starts with <unk>, <eos>")
        self.vocab = vocab
        self.index = {w: i for i, w in enumerate(vocab)}

    @classmethod
    def build(cls, text: str, max_vocab: int = 0) -> Any:
        """A tokenizer of this class whose vocabulary is ``text``'s words, most frequent first (at most
        ``max_vocab`` entries with <unk> and <eos>; 0: every word)."""
        counts = collections.Counter(text.split())
        counts.pop(cls.UNK, None)
        counts.pop(cls.EOS, None)
        words = sorted(counts, key=lambda w: (-counts[w], w))
        if max_vocab:
            words = words[: max(0, max_vocab - 2)]
        return cls([cls.UNK, cls.EOS, *words])

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> Any:
        """The text's token ids (numpy int64 here; a torch tensor from ``ponder.data.WordTokenizer``)."""
        unk, eos, index = 0, 1, self.index
        ids: list[int] = []
        for line in text.splitlines():
            ids.extend(index.get(w, unk) for w in line.split())
            ids.append(eos)
        return np.array(ids, dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        lines, words = [], []
        for i in ids:
            if int(i) == 1:
                lines.append(" ".join(words) + "\n")
                words = []
            else:
                words.append(self.vocab[int(i)])
        return "".join(lines) + " ".join(words)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "word", "vocab": self.vocab}


Tokenizer = ByteTokenizer | WordTokenizer


def tokenizer_from_json(data: dict[str, Any]) -> Tokenizer:
    """The tokenizer a ``to_json()`` description (a checkpoint's or an exported model's config) names."""
    if data.get("kind") == "byte":
        return ByteTokenizer()
    if data.get("kind") == "word" and isinstance(data.get("vocab"), list):
        return WordTokenizer(data["vocab"])
    raise DataError(f"unknown tokenizer description {str(data)[:80]!r}")


def embedded_corpus() -> str:
    """Python's own English documentation topics (``pydoc_data.topics``): about 460 kB of text."""
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics))


def split_text(text: str, fractions: tuple[float, float] = (0.9, 0.05)) -> dict[str, str]:
    """Split at line boundaries into train / valid / test by size (the rest is test)."""
    lines = text.splitlines(keepends=True)
    total = sum(len(line) for line in lines)
    bounds = [fractions[0] * total, (fractions[0] + fractions[1]) * total]
    parts: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    seen = 0
    for line in lines:
        split = "train" if seen < bounds[0] else "valid" if seen < bounds[1] else "test"
        parts[split].append(line)
        seen += len(line)
    return {k: "".join(v) for k, v in parts.items()}


def embedded_validation_text() -> str:
    """The validation part of the embedded corpus: what a model trained on it never saw (the bench's text)."""
    return split_text(embedded_corpus())["valid"]
