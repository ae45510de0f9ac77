"""Mistakes that used to end in a traceback (issue 21): each is now one line that names the bad value and what to
do, with a non-zero exit, and nothing half-written. Argument errors run the real CLI in a separate process; the
ones that need torch call ``ponder.cli.main`` in this process (the same code, without a second torch import)."""

from __future__ import annotations

import shutil
import signal

import pytest
from helpers import run_ponder, write_tiny_config

from ponder.cli import main


def ponder(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in this process: ``(exit status, stdout, stderr)``; an argparse error counts as its exit status."""
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    finally:
        signal.signal(signal.SIGTERM, sigterm)  # main() makes SIGTERM unwind; leave pytest's handling as it was
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The one error line of ``err`` (argparse prints its usage above it; ponder may print a progress line)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished 8-step run of a tiny model: checkpoints step-00000004 and step-00000008."""
    from ponder.config import load_config
    from ponder.train import Trainer

    root = tmp_path_factory.mktemp("tiny-run")
    Trainer(load_config(write_tiny_config(root, steps=8)), root / "run", progress=False).train()
    assert sorted(p.name for p in (root / "run" / "checkpoints").iterdir()) == ["step-00000004", "step-00000008"]
    return root


# -- 1. ponder train --out where no folder can be made -------------------------------------------------------------

@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_train_out_that_cannot_be_a_folder(capsys, tmp_path, where):
    config = write_tiny_config(tmp_path / "cfg", steps=2)
    (tmp_path / "somefile").write_text("not a folder\n")
    out = str(tmp_path / "somefile" / "run") if where == "under-a-file" else "/proc/ponder-run"
    code, _, err = ponder(capsys, "train", "--config", str(config), "--out", out, "--no-progress")
    line = error_line(err)
    assert code == 2
    assert line.startswith("ponder: error:") and out in line and "--out" in line
    if where == "under-a-file":
        assert "is a file, not a folder" in line and str(tmp_path / "somefile") in line
    assert (tmp_path / "somefile").read_text() == "not a folder\n"


# -- 2. and 3. ponder export: an unwritable output, an opset out of range -----------------------------------------

@pytest.mark.parametrize("output", ["/proc/m.onnx", "a-folder", "somefile/m.onnx"])
def test_export_to_a_path_that_cannot_be_written(capsys, tmp_path, tiny_run, output):
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "somefile").write_text("x")
    target = output if output.startswith("/") else str(tmp_path / output)
    code, _, err = ponder(capsys, "export", str(tiny_run / "run"), "-o", target, "--skip-check")
    line = error_line(err)
    assert code == 2 and line.startswith("ponder: error:")
    named = {"/proc/m.onnx": "/proc", "a-folder": target, "somefile/m.onnx": str(tmp_path / "somefile")}[output]
    assert repr(named) in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-folder", "somefile"]
    assert list((tmp_path / "a-folder").iterdir()) == []


@pytest.mark.parametrize("opset", ["3", "99"])
def test_export_opset_out_of_range_names_the_supported_range(capsys, tmp_path, tiny_run, opset):
    import onnx

    out = tmp_path / "m.onnx"
    code, _, err = ponder(capsys, "export", str(tiny_run / "run"), "-o", str(out), "--opset", opset, "--skip-check")
    line = error_line(err)
    assert code == 2
    assert f"--opset {opset}" in line and f"18 to {onnx.defs.onnx_opset_version()}" in line, line
    assert not out.exists()


# -- 4. ponder serve --max-message-mb beyond gRPC's limit ---------------------------------------------------------

def test_serve_max_message_mb_beyond_grpc_limit(tmp_path):
    proc = run_ponder("serve", "--repository", str(tmp_path), "--max-message-mb", "4096", check=False)
    line = error_line(proc.stderr)
    assert proc.returncode == 2
    assert "--max-message-mb" in line and "4096" in line and "2047" in line and "signed 32-bit" in line, line


# -- 5. ponder tune --storage that cannot be opened ---------------------------------------------------------------

@pytest.mark.parametrize("storage", ["bogus://x", "sqlite:////proc/nowhere/tune.db"])
def test_tune_storage_that_cannot_be_opened(capsys, tmp_path, storage):
    out = tmp_path / "tune"
    code, _, err = ponder(capsys, "tune", "--storage", storage, "--thresholds", "0.9", "--lambdas", "0.01",
                          "--steps", "1", "--epochs", "1", "--d-model", "32", "--n-layers", "2", "--seq-len", "32",
                          "--eval-batches", "1", "--no-progress", "--output-dir", str(out))
    line = error_line(err)
    assert code == 2
    assert repr(storage) in line and "sqlite:///" in line and "postgresql://" in line, line
    assert not out.exists()


# -- 6. -p NAME that names no installed plugin ----------------------------------------------------------------------

@pytest.mark.parametrize("switch", ["nosuchplugin", "no:nosuchplugin"])
def test_plugin_switch_naming_no_installed_plugin_warns(switch):
    proc = run_ponder("-p", switch, "plugins", "list")
    assert "Traceback" not in proc.stderr
    warning = [line for line in proc.stderr.splitlines() if "warning:" in line]
    assert len(warning) == 1, proc.stderr
    assert warning[0].startswith("ponder: warning: -p ") and "no plugin named 'nosuchplugin' is installed" in \
        warning[0] and "installed: " in warning[0] and "ponder.norm" in warning[0], warning[0]
    assert "layernorm" in proc.stdout  # a warning, not an error: the listing still comes


# -- 7. serve and client settings refused when parsed ------------------------------------------------------------

@pytest.mark.parametrize(("flag", "value"), [("--threads", "-1"), ("--threads", "0"), ("--grace", "nan"),
                                             ("--grace", "-1"), ("--grace", "inf")])
def test_serve_refuses_bad_settings_when_parsing(tmp_path, flag, value):
    proc = run_ponder("serve", "--repository", str(tmp_path), flag, value, check=False)
    line = error_line(proc.stderr)
    assert proc.returncode == 2
    assert line.startswith("ponder serve: error: argument") and flag in line and repr(value) in line, line


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_client_refuses_a_timeout_that_is_not_a_positive_number_of_seconds(value):
    proc = run_ponder("client", "--address", "127.0.0.1:1", "--timeout", value, "health", check=False)
    line = error_line(proc.stderr)
    assert proc.returncode == 2
    assert line.startswith("ponder client: error: argument --timeout") and repr(value) in line, line


# -- 8. --resume when the latest checkpoint is damaged --------------------------------------------------------------

def test_resume_from_a_damaged_latest_checkpoint_names_the_intact_earlier_one(capsys, tmp_path, tiny_run):
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run)
    damaged = run / "checkpoints" / "step-00000008"
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short, as a full disk or a copy gone wrong leaves it

    code, _, err = ponder(capsys, "train", "--out", str(run), "--resume", "--steps", "10", "--no-progress")
    line = error_line(err)
    assert code == 2
    assert str(weights) in line and "corrupt" in line, line
    assert f"move {damaged}" in line and "step-00000004" in line, line
    assert weights.stat().st_size == 100 and (run / "checkpoints" / "step-00000004").is_dir()  # nothing deleted

    # doing what the message says resumes from the intact checkpoint
    shutil.move(damaged, tmp_path / "damaged-step-00000008")
    code, out, err = ponder(capsys, "train", "--out", str(run), "--resume", "--steps", "10", "--no-progress")
    assert code == 0, err
    assert "Traceback" not in err and "from step 4 to 10" in err
    assert "resuming from step-00000004" in err
    assert (run / "latest").read_text().strip() == "step-00000010"
