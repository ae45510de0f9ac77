"""Tokenizers, the embedded corpus, WikiText-2 from a local folder, and batches."""

from __future__ import annotations

import pytest
import torch

from ponder.config import DataConfig
from ponder.data import (
    ByteTokenizer,
    TokenChunks,
    WordTokenizer,
    embedded_corpus,
    epoch_order,
    get_wikitext2_dataloaders,
    prepare_data,
    split_text,
    tokenizer_from_json,
)
from ponder.errors import DataError

SAMPLE = {
    "train": " = Valkyria Chronicles = \n\n The game began development in 2010 . \n It was a <unk> success . \n" * 40,
    "valid": " = Tower Building = \n The tower was built in 1924 . \n" * 20,
    "test": " = Robert Boulter = \n Robert Boulter is an English actor . \n" * 20,
}


def write_wikitext(folder, ext="raw"):
    folder.mkdir(exist_ok=True)
    for split, text in SAMPLE.items():
        (folder / f"wiki.{split}.{ext}").write_text(text)
    return folder


def test_byte_tokenizer_round_trips_unicode():
    tok = ByteTokenizer()
    ids = tok.encode("héllo ∑")
    assert ids.dtype == torch.long and int(ids.max()) < 256 and len(ids) == len("héllo ∑".encode())
    assert tok.decode(ids) == "héllo ∑"
    assert isinstance(tokenizer_from_json(tok.to_json()), ByteTokenizer)


def test_word_tokenizer_builds_by_frequency_with_unk_and_eos():
    tok = WordTokenizer.build("b a a\nc a b\n", max_vocab=4)
    assert tok.vocab == ["<unk>", "<eos>", "a", "b"]
    assert tok.encode("a c\nb").tolist() == [2, 0, 1, 3, 1]
    assert tok.decode(tok.encode("a b\nb a")) == "a b\nb a\n"
    again = tokenizer_from_json(tok.to_json())
    assert again.vocab == tok.vocab


def test_the_torch_free_tokenizers_give_the_same_ids_as_numpy():
    """ponder.text's tokenizers (what serving reads text with) and ponder.data's (training's) are one: the same ids,
    numpy in one, a LongTensor in the other; ponder.data re-exports the text helpers."""
    import numpy as np

    from ponder import data, text

    words = text.WordTokenizer.build(SAMPLE["train"], max_vocab=12)
    for spec in ({"kind": "byte"}, words.to_json()):
        served, trained = text.tokenizer_from_json(spec), data.tokenizer_from_json(spec)
        assert isinstance(trained, type(served)) and trained.to_json() == served.to_json()
        for sample in ("The game began development in 2010 .\nIt was a hit", "", "héllo ∑"):
            ids, tensor = served.encode(sample), trained.encode(sample)
            assert isinstance(ids, np.ndarray) and ids.dtype == np.int64
            assert tensor.dtype == torch.long and tensor.tolist() == ids.tolist()
            assert served.decode(ids) == trained.decode(tensor)
    assert isinstance(data.WordTokenizer.build("a b a"), data.WordTokenizer)
    assert data.embedded_corpus is text.embedded_corpus and data.split_text is text.split_text
    assert text.embedded_validation_text() == split_text(embedded_corpus())["valid"]
    with pytest.raises(DataError, match="unknown tokenizer description"):
        text.tokenizer_from_json({"kind": "sentencepiece"})


def test_embedded_corpus_is_real_english_text():
    text = embedded_corpus()
    assert len(text) > 100_000 and "statement" in text
    parts = split_text(text)
    assert sum(map(len, parts.values())) == len(text)
    assert 0.85 < len(parts["train"]) / len(text) < 0.95 and parts["valid"] and parts["test"]


def test_wikitext2_from_a_local_folder(tmp_path):
    folder = write_wikitext(tmp_path / "wikitext-2", "tokens")
    train, valid, test, vocab_size = get_wikitext2_dataloaders(folder, batch_size=4, n_seq=8)
    x, y = next(iter(train))
    assert x.shape == (4, 8) and torch.equal(x[:, 1:], y[:, :-1])
    assert vocab_size == len(set(SAMPLE["train"].split()) | {"<eos>"})  # <unk> is already in the text
    assert len(valid.dataset) > 0 and len(test.dataset) > 0


def test_wikitext2_raw_files_with_bytes(tmp_path):
    folder = write_wikitext(tmp_path / "w2", "raw")
    corpus = prepare_data(DataConfig(source="wikitext2", path=str(folder), tokenizer="byte"))
    assert ByteTokenizer().decode(corpus.splits["valid"]) == SAMPLE["valid"]


def test_missing_wikitext_folder_or_file_says_what_to_put_where(tmp_path):
    with pytest.raises(DataError, match=r"does not exist: put wiki.train.raw, wiki.valid.raw and wiki.test.raw"):
        get_wikitext2_dataloaders(tmp_path / "nope", 4, 8)
    folder = write_wikitext(tmp_path / "partial")
    (folder / "wiki.test.raw").unlink()
    with pytest.raises(DataError, match=r"has no wiki.test.raw or wiki.test.tokens"):
        get_wikitext2_dataloaders(folder, 4, 8)


def test_chunks_batch_and_epoch_order_are_deterministic():
    chunks = TokenChunks(torch.arange(101), 10)
    assert len(chunks) == 10
    x, y = chunks.batch(torch.tensor([0, 3]))
    assert x.tolist()[1] == list(range(30, 40)) and y.tolist()[1] == list(range(31, 41))
    assert torch.equal(epoch_order(10, 0, 1), epoch_order(10, 0, 1))
    assert not torch.equal(epoch_order(10, 0, 1), epoch_order(10, 0, 2))
    with pytest.raises(DataError, match="too few"):
        TokenChunks(torch.arange(5), 10)
