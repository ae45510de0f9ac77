"""Rough edges a user noticed: the tune table and its flags, turning text into a word-level model's ids
(``ponder tokenize``, and ``ponder client infer --text`` refusing such a model), ``ponder inspect`` on folders,
a top-level key written after a section, and internal jargon in the help texts."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys

import pytest
from helpers import run_ponder, write_tiny_config

from ponder.cli import main
from ponder.errors import ConfigError

# -- ponder tune: the table and the flags -------------------------------------------------------------------------


def tune_report(**extra):
    """A report shaped like run_act_hyperparameter_tuning's: every batch runs all 4 layers, tokens 3.5 on average."""
    rows = [{"threshold": t, "lambda": lam, "final_val_perplexity": 6.5, "avg_layers_executed": 4.0,
             "mean_token_depth": 3.5, "speedup_potential": 1.0, "score": 46.5, "training_time": 1.0}
            for lam in (0.01, 0.1) for t in (0.5, 0.99)]
    return {"best_config": {"threshold": 0.5, "lambda": 0.01}, "best_score": 46.5, "all_results": rows,
            "score_metric": "balanced", "n_layers": 4, "n_trainings": 2, "resumed_trials": 0, "cells_computed_here": 4,
            "model": {"d_model": 64, "n_layers": 4, "n_heads": 2, "d_ff": 256, "max_seq_len": 128, "vocab_size": 256},
            "data": "the embedded corpus (bytes)", **extra}


def test_tune_table_shows_mean_token_depth_and_the_models_shape():
    from ponder.tune import format_table

    lines = format_table(tune_report()).splitlines()
    header, columns, rows = lines[0], lines[1], lines[2:-1]
    for part in ("d_model 64", "n_layers 4", "n_heads 2", "d_ff 256", "max_seq_len 128", "vocab_size 256",
                 "the embedded corpus (bytes)"):
        assert part in header
    assert "layers executed" in columns and "mean token depth" in columns
    assert len(rows) == 4
    for row in rows:
        cells = row.split()
        assert cells[3:5] == ["4.00", "3.50"]  # layers executed, then mean token depth, side by side
    assert "mean token depth" in lines[-1]


def test_a_real_tuning_reports_the_shape_and_data_the_table_prints(tmp_path):
    from ponder.data import embedded_corpus
    from ponder.tune import format_table, run_act_hyperparameter_tuning

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(embedded_corpus()[:6000])
    report = run_act_hyperparameter_tuning(corpus, 4, 1, tmp_path / "out", threshold_values=[0.5], lambda_values=[0.01],
                                           d_model=16, n_layers=2, n_seq=16, max_steps=1, max_eval_batches=1,
                                           progress=False)
    assert report["model"] == {"d_model": 16, "n_layers": 2, "n_heads": 1, "d_ff": 64, "max_seq_len": 16,
                               "vocab_size": 256}
    assert report["data"] == f"{corpus} (bytes)"
    saved = json.loads((tmp_path / "out" / "act_tuning_results.json").read_text())
    assert saved["model"] == report["model"] and saved["data"] == report["data"]
    text = format_table(report)
    assert "d_model 16, n_layers 2" in text and f"{corpus} (bytes)" in text
    depth = report["all_results"][0]["mean_token_depth"]
    assert f"{depth:.2f}" in text.splitlines()[2].split()


def _subparser(parser: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    for name in names:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def _option_entries(help_text: str) -> dict[str, str]:
    """``{first flag: its help}`` from the options section of an argparse help text."""
    section = help_text.split("options:", 1)[1]
    entries: dict[str, str] = {}
    flag = None
    for line in section.splitlines():
        stripped = line.strip()
        if line.startswith("  -"):
            flag = stripped.split()[0].rstrip(",")
            spec = stripped.split("  ", 1)
            entries[flag] = spec[1].strip() if len(spec) > 1 else ""
        elif flag and stripped:
            entries[flag] += " " + stripped
    return entries


def test_tune_help_explains_every_option_with_its_default(monkeypatch):
    from ponder.cli import build_parser

    monkeypatch.setenv("COLUMNS", "200")
    tune = _subparser(build_parser(), "tune")
    entries = _option_entries(tune.format_help())
    flags = {a.option_strings[0] for a in tune._actions if a.option_strings}
    assert set(entries) == flags
    for flag, text in entries.items():
        assert text, f"{flag} has no help"
        if flag not in ("-h", "-p"):
            assert "default" in text, f"{flag}: no default in {text!r}"
    assert "(default: 0.5 0.8 0.9 0.95 0.99)" in entries["--thresholds"]
    assert "(default: 128)" in entries["--seq-len"] and "(default: cpu)" in entries["--device"]


# -- ponder tokenize, and ponder client infer --text on a word-level model ----------------------------------------

WORDS = ["<unk>", "<eos>", "the", "cat", "sat", *(f"w{i}" for i in range(5, 256))]  # 256, as the model's vocab


@pytest.fixture(scope="module")
def word_repository(model_repository, tmp_path_factory):
    """A repository with a word-level model (the byte-level test model's graph, with a 256-word vocabulary in the
    config.json beside it, as `ponder export` writes for word-level runs) and the byte-level one: no new export."""
    root = tmp_path_factory.mktemp("word-repository")
    shutil.copytree(model_repository / "tiny" / "1", root / "tiny" / "1")
    (root / "words" / "1").mkdir(parents=True)
    shutil.copy(model_repository / "tiny" / "1" / "model.onnx", root / "words" / "1" / "model.onnx")
    (root / "words" / "1" / "config.json").write_text(json.dumps({"tokenizer": {"kind": "word", "vocab": WORDS}}))
    return root


def ponder(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in this process: ``(exit status, stdout, stderr)``."""
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        code = main(list(args))
    finally:
        signal.signal(signal.SIGTERM, sigterm)  # main() makes SIGTERM unwind; leave pytest's handling as it was
    out, err = capsys.readouterr()
    return code, out, err


def test_tokenize_a_byte_level_model_from_its_version_or_model_folder(capsys, model_repository):
    for target in (model_repository / "tiny" / "1", model_repository / "tiny", model_repository / "tiny" / "2" /
                   "model.onnx"):
        assert ponder(capsys, "tokenize", str(target), "--text", "The ü") == (0, "84 104 101 32 195 188\n", "")
    assert ponder(capsys, "tokenize", str(model_repository / "tiny"), "--decode", "84,104 101")[:2] == (0, "The\n")
    code, out, _ = ponder(capsys, "tokenize", str(model_repository / "tiny"), "--text", "Hi", "--json")
    assert code == 0 and json.loads(out) | {"source": ""} == {"tokenizer": "byte", "vocab_size": 256, "source": "",
                                                               "ids": [72, 105], "unknown": 0}
    code, _, err = ponder(capsys, "tokenize", str(model_repository / "tiny"), "--decode", "256")
    assert code == 2 and "256 is not a token id of this model (its ids are 0..255)" in err


def test_tokenize_a_word_level_model_with_the_vocabulary_beside_it(capsys, word_repository):
    words = word_repository / "words"
    assert ponder(capsys, "tokenize", str(words), "--text", "the cat sat") == (0, "2 3 4 1\n", "")
    code, out, err = ponder(capsys, "tokenize", str(words / "1"), "--text", "the dog sat\ncat")
    assert (code, out) == (0, "2 0 4 1 3 1\n") and "1 of 6 tokens are <unk>" in err
    assert ponder(capsys, "tokenize", str(words), "--decode", "2 3 4 1")[:2] == (0, "the cat sat\n\n")
    code, _, err = ponder(capsys, "tokenize", str(word_repository / "nothing"), "--text", "x")
    assert code == 2 and "does not exist" in err


def test_tokenize_a_word_level_training_run_as_it_was_trained(capsys, tmp_path):
    from ponder.config import load_config
    from ponder.data import tokenizer_from_json
    from ponder.train import Trainer

    config = write_tiny_config(tmp_path, steps=1)
    config.write_text(config.read_text().replace('source = "text"', 'source = "text"\ntokenizer = "word"'))
    run = tmp_path / "run"
    Trainer(load_config(config), run, progress=False).train()
    saved = json.loads(next((run / "checkpoints").iterdir()).joinpath("config.json").read_text())["tokenizer"]
    assert saved["kind"] == "word"
    vocab = saved["vocab"]
    text = f"{vocab[2]} {vocab[5]} zzz-not-a-word"
    assert [int(i) for i in tokenizer_from_json(saved).encode(text)] == [2, 5, 0, 1]  # what training read
    code, out, err = ponder(capsys, "tokenize", str(run), "--text", text)
    assert code == 0 and out.split() == ["2", "5", "0", "1"] and "<unk>" in err
    assert ponder(capsys, "tokenize", str(run), "--decode", "2 5")[:2] == (0, f"{vocab[2]} {vocab[5]}\n")


def test_tokenize_help_does_not_import_torch():
    code = ("import sys, contextlib, io\nfrom ponder.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: main(['tokenize', '--help'])\n"
            "    except SystemExit: pass\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.fixture(scope="module")
def word_server(word_repository):
    from ponder.serve.server import create_server

    srv, port = create_server(word_repository, "127.0.0.1:0", workers=1, max_queue=4)
    srv.start()
    yield f"127.0.0.1:{port}"
    srv.drain(grace=2)


def test_client_infer_text_refuses_a_word_level_model_and_takes_its_ids(capsys, word_server):
    address = ["client", "--address", word_server, "infer"]
    code, out, err = ponder(capsys, *address, "--model", "words", "--text", "the cat")
    assert code == 2 and out == ""
    assert "'words' is word-level" in err and "ponder tokenize" in err and "--ids" in err
    code, out, _ = ponder(capsys, *address, "--model", "words", "--ids", "2 3 4 1", "--json")
    assert code == 0 and json.loads(out)["model"] == "words"
    code, out, _ = ponder(capsys, *address, "--model", "tiny", "--text", "The cat")
    assert code == 0 and "next token" in out  # a byte-level model still takes text


def test_client_text_ids(word_server):
    from ponder.errors import PonderError
    from ponder.serve.client import Client

    with Client(word_server) as client:
        assert client.text_ids("tiny", "Hé") == [72, 195, 169]
        with pytest.raises(PonderError, match="word-level"):
            client.text_ids("words", "the cat")


# -- ponder inspect on folders ---------------------------------------------------------------------------------


def test_inspect_takes_a_version_folder_and_a_model_folder(capsys, model_repository):
    by_file = json.loads(ponder(capsys, "inspect", str(model_repository / "tiny" / "2" / "model.onnx"), "--json")[1])
    for target in (model_repository / "tiny" / "2", model_repository / "tiny"):  # tiny's newest version is 2
        code, out, err = ponder(capsys, "inspect", str(target), "--json")
        assert code == 0, err
        assert json.loads(out) == by_file
    code, out, _ = ponder(capsys, "inspect", str(model_repository / "tiny" / "1"))
    assert code == 0 and "n_layers: 3" in out
    code, _, err = ponder(capsys, "inspect", str(model_repository / "tiny" / "9"))
    assert code == 2 and "does not exist" in err


# -- a top-level key written after a section -------------------------------------------------------------------


@pytest.mark.parametrize(("text", "section", "key"), [
    ('[train]\nsteps = 3\ncontrollers = [{name = "autonomic"}]\n', "train", "controllers"),
    ('[optimizer]\nname = "adamw"\ncontrollers = [{name = "autonomic"}]\n', "optimizer", "controllers"),
    ('[data]\nsource = "embedded"\nnorm = "dyt"\n', "data", "norm"),
])
def test_a_top_level_key_after_a_section_says_where_it_belongs(tmp_path, text, section, key):
    from ponder.config import load_config

    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert f"[{section}] has {key!r}, a top-level key that must go before any section" in message
    assert "unknown key" not in message


def test_the_same_keys_before_any_section_are_fine(tmp_path):
    from ponder.config import load_config

    path = tmp_path / "run.toml"
    path.write_text('norm = "dyt"\ncontrollers = [{name = "autonomic"}]\n[train]\nsteps = 3\n')
    run = load_config(path)
    assert run.norm.name == "dyt" and [c.name for c in run.controllers] == ["autonomic"] and run.train.steps == 3


# -- no internal jargon in what a user reads ---------------------------------------------------------------------


def _all_parsers(parser: argparse.ArgumentParser, path=("ponder",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, (*path, name))


def test_no_seed_jargon_in_any_help_or_plugin_listing(capsys):
    from ponder.cli import build_parser

    parsers = list(_all_parsers(build_parser()))
    assert len(parsers) > 20 and any(path == ("ponder", "tokenize") for path, _ in parsers)
    for path, parser in parsers:
        text = parser.format_help()
        assert "seed 00" not in text.lower(), " ".join(path)
    assert "dials" in _subparser(build_parser(), "analyze").format_help()
    listing = run_ponder("plugins", "list").stdout
    assert "seed 00" not in listing.lower()
    for kind, name in (("controller", "autonomic"), ("controller", "adyt"), ("optimizer", "dag"), ("norm", "adyt")):
        shown = ponder(capsys, "plugins", "show", kind, name, "--json")[1]
        assert "seed 00" not in shown.lower() and "the seed" not in shown.lower(), name
