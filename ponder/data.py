"""Text, tokenizers and batches for training. Nothing is downloaded: data comes from local files or from the
English documentation that every Python install ships (``pydoc_data.topics``).

The text helpers and the tokenizers themselves live in the torch-free ``ponder.text`` (serving reads text with
them); the tokenizers here are the same ones, with ``encode`` giving a torch tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ponder import text as _text
from ponder.config import DataConfig
from ponder.errors import DataError
from ponder.text import embedded_corpus, split_text


class ByteTokenizer(_text.ByteTokenizer):
    """UTF-8 bytes as tokens: 256 ids, no vocabulary to build or ship (``encode`` gives a LongTensor)."""

    def encode(self, text: str) -> Tensor:
        return torch.from_numpy(super().encode(text))


class WordTokenizer(_text.WordTokenizer):
    """Whitespace-separated words, one ``<eos>`` per line, ``<unk>`` for words outside the vocabulary
    (WikiText-2 style). The vocabulary is built from the training split, most frequent first (``encode`` gives a
    LongTensor)."""

    def encode(self, text: str) -> Tensor:
        return torch.from_numpy(super().encode(text))


Tokenizer = ByteTokenizer | WordTokenizer


def tokenizer_from_json(data: dict[str, Any]) -> Tokenizer:
    """The tokenizer a ``to_json()`` description names (:func:`ponder.text.tokenizer_from_json`, giving tensors)."""
    found = _text.tokenizer_from_json(data)
    return WordTokenizer(found.vocab) if isinstance(found, _text.WordTokenizer) else ByteTokenizer()


WIKITEXT_SPLITS = ("train", "valid", "test")


def read_wikitext2(path: str | Path, prefer: str = "tokens") -> dict[str, str]:
    """The three WikiText-2 splits from a local folder (``wiki.{train,valid,test}.{tokens,raw}``)."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"WikiText-2 folder {str(folder)!r} does not exist: put wiki.train.raw, wiki.valid.raw "
                        "and wiki.test.raw (or the .tokens files) in it")
    order = ("tokens", "raw") if prefer == "tokens" else ("raw", "tokens")
    out = {}
    for split in WIKITEXT_SPLITS:
        candidates = [folder / f"wiki.{split}.{ext}" for ext in order]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise DataError(f"{str(folder)!r} has no wiki.{split}.raw or wiki.{split}.tokens: "
                            "WikiText-2 needs all three splits (train, valid, test)")
        out[split] = found.read_text(encoding="utf-8")
    return out


def read_text_file(path: str | Path) -> dict[str, str]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"text file {str(p)!r} does not exist (data.source = 'text' splits one file 90/5/5)")
    return split_text(p.read_text(encoding="utf-8"))


@dataclass
class Corpus:
    """Token ids of each split, and the tokenizer that made them."""

    tokenizer: Tokenizer
    splits: dict[str, Tensor]


def prepare_data(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> Corpus:
    """Read the configured text and tokenize it (building a word vocabulary unless one is given)."""
    if cfg.source == "embedded":
        texts = split_text(embedded_corpus())
    elif cfg.source == "wikitext2":
        texts = read_wikitext2(cfg.path, prefer="tokens" if cfg.tokenizer == "word" else "raw")
    else:
        texts = read_text_file(cfg.path)
    if tokenizer is None:
        tokenizer = ByteTokenizer() if cfg.tokenizer == "byte" else WordTokenizer.build(texts["train"], cfg.max_vocab)
    return Corpus(tokenizer, {k: tokenizer.encode(v) for k, v in texts.items()})


class TokenChunks(Dataset):
    """Non-overlapping ``(input, target)`` windows of ``seq_len`` tokens, targets shifted by one."""

    def __init__(self, ids: Tensor, seq_len: int) -> None:
        n = (len(ids) - 1) // seq_len
        if n < 1:
            raise DataError(f"{len(ids)} tokens are too few for one sequence of {seq_len}")
        self.data = ids[: n * seq_len + 1]
        self.seq_len = seq_len

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.seq_len

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        start = i * self.seq_len
        return self.data[start: start + self.seq_len], self.data[start + 1: start + self.seq_len + 1]

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        starts = indices[:, None] * self.seq_len + torch.arange(self.seq_len + 1)
        window = self.data[starts]
        return window[:, :-1], window[:, 1:]


def epoch_order(n_items: int, seed: int, epoch: int) -> Tensor:
    """The shuffled item order of one epoch: a function of (seed, epoch) only, so resuming is exact."""
    return torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def get_wikitext2_dataloaders(data_path: str | Path, batch_size: int, n_seq: int, tokenizer: str = "word",
                              seed: int = 0) -> tuple[DataLoader, DataLoader, DataLoader, int]:
    """``(train_loader, val_loader, test_loader, vocab_size)`` from a local WikiText-2 folder."""
    corpus = prepare_data(DataConfig(source="wikitext2", path=str(data_path), tokenizer=tokenizer))
    loaders = []
    for split in WIKITEXT_SPLITS:
        chunks = TokenChunks(corpus.splits[split], n_seq)
        gen = torch.Generator().manual_seed(seed) if split == "train" else None
        loaders.append(DataLoader(chunks, batch_size=batch_size, shuffle=split == "train", generator=gen))
    return loaders[0], loaders[1], loaders[2], corpus.tokenizer.vocab_size
