"""The tuner's data: loaders over a corpus, and what a loader hands the Trainer.

The loaders are the tuner's entry point (``grid_search(train_loader, val_loader, ...)``), but the tuner trains
through :class:`ponder.train.Trainer`, which orders each epoch itself (``epoch_order`` of its seed) and evaluates
through :func:`ponder.evaluate.evaluate`. From a loader it takes only the token windows (``loader.dataset``, a
:class:`ponder.data.TokenChunks`) and the batch size; the loader's shuffling is not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ponder.config import DataConfig
from ponder.data import Corpus, TokenChunks, prepare_data
from ponder.errors import ConfigError, DataError


def data_config(data_path: str | Path | None) -> DataConfig:
    """The embedded corpus (bytes) when ``data_path`` is None, a text file (bytes, split 90/5/5), or a WikiText-2
    folder (words). A given path that is missing is an error."""
    if data_path is None:
        return DataConfig(source="embedded")
    p = Path(data_path)
    if p.is_file():
        return DataConfig(source="text", path=str(p))
    if p.is_dir():
        return DataConfig(source="wikitext2", path=str(p), tokenizer="word")
    raise DataError(f"data path {str(p)!r} does not exist: give a WikiText-2 folder or a text file, "
                    "or leave it out for the embedded corpus")


def loaders_for(corpus: Corpus, batch_size: int, n_seq: int, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """``(train_loader, val_loader)`` over ``corpus``'s train and valid splits in windows of ``n_seq`` tokens."""
    train = TokenChunks(corpus.splits["train"], n_seq)
    valid = TokenChunks(corpus.splits["valid"], n_seq)
    gen = torch.Generator().manual_seed(seed)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen, drop_last=len(train) > batch_size),
            DataLoader(valid, batch_size=batch_size))


def make_loaders(data_path: str | Path | None, batch_size: int, n_seq: int, seed: int = 0,
                 text_chars: int | None = None) -> tuple[DataLoader, DataLoader, int]:
    """``(train_loader, val_loader, vocab_size)`` of :func:`data_config`'s data (``text_chars`` is not used;
    it is kept so that older calls still work)."""
    corpus = prepare_data(data_config(data_path))
    return (*loaders_for(corpus, batch_size, n_seq, seed), corpus.tokenizer.vocab_size)


def describe_data(data: str | Path | DataConfig | None) -> str:
    """What the tuner read, in words (the report's ``data``): a ``make_loaders`` path, or a run's ``[data]``."""
    if data is None:
        return "the embedded corpus (bytes)"
    if isinstance(data, DataConfig):
        words = "words" if data.tokenizer == "word" else "bytes"
        if data.source == "embedded":
            return f"the embedded corpus ({words})"
        kind = "WikiText-2, " if data.source == "wikitext2" else ""
        return f"{data.path} ({kind}{words})"
    kind = "WikiText-2, words" if Path(data).is_dir() else "bytes"
    return f"{data} ({kind})"


@dataclass(frozen=True)
class TokenIds:
    """The tokenizer the Trainer is given with a loader's token ids. A loader carries ids, not the tokenizer that
    made them, and an in-memory training needs only the vocabulary size: it writes no checkpoint (which is where
    a tokenizer is recorded)."""

    vocab_size: int
    kind = "ids"

    def to_json(self) -> dict[str, Any]:
        raise ConfigError("the tuner's trainings are in memory: their tokenizer is not known and nothing is saved")


def chunks_of(loader: Any, what: str) -> tuple[TokenChunks, int]:
    """``(loader.dataset, loader.batch_size)``; a ConfigError unless the loader batches a TokenChunks."""
    dataset, batch_size = getattr(loader, "dataset", None), getattr(loader, "batch_size", None)
    if not isinstance(dataset, TokenChunks) or not isinstance(batch_size, int):
        kind = type(dataset).__name__ if dataset is not None else type(loader).__name__
        raise ConfigError(f"the {what} loader batches a {kind}: the tuner trains through ponder's Trainer, which "
                          "reads token windows from a ponder.data.TokenChunks; give DataLoader(TokenChunks(ids, "
                          "seq_len), batch_size=N), e.g. from ponder.tune.make_loaders")
    return dataset, batch_size


@dataclass(frozen=True)
class TuningData:
    """The token windows and batch sizes a tuning trains and evaluates on, and the corpus the Trainer is given."""

    train: TokenChunks
    valid: TokenChunks
    batch_size: int  # training
    eval_batch_size: int
    vocab_size: int

    @classmethod
    def of(cls, train_loader: Any, val_loader: Any, vocab_size: int) -> TuningData:
        train, batch_size = chunks_of(train_loader, "training")
        valid, eval_batch_size = chunks_of(val_loader, "validation") if val_loader is not None else (train, batch_size)
        if valid.seq_len != train.seq_len:
            raise ConfigError(f"the training loader's sequences have {train.seq_len} tokens, the validation "
                              f"loader's {valid.seq_len}: give both the same seq_len")
        return cls(train, valid, batch_size, eval_batch_size, vocab_size)

    @property
    def seq_len(self) -> int:
        return self.train.seq_len

    @property
    def steps_per_epoch(self) -> int:
        """As the Trainer counts them: full batches of ``batch_size`` sequences."""
        return len(self.train) // self.batch_size

    def corpus(self) -> Corpus:
        """The loaders' token ids as a Corpus for ``Trainer(corpus=...)`` (the Trainer re-cuts them at seq_len)."""
        return Corpus(TokenIds(self.vocab_size), {"train": self.train.data, "valid": self.valid.data})  # type: ignore[arg-type]
