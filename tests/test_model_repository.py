"""The model repository's rules (``ponder.model_repository``), and that export and serve keep the same ones: a name
``ponder export`` accepts is a name ``ponder serve`` serves, and one serve would skip is refused at export."""

from __future__ import annotations

import signal

import pytest
from helpers import write_tiny_config

from ponder import model_repository as mr
from ponder.errors import ConfigError, NotFoundError, PonderError

# -- names ----------------------------------------------------------------------------------------------------------

GOOD_NAMES = ["tiny", "my-model.v2", "A_1", "7", "x.y-z_w", "demo"]
BAD_NAMES = ["", "my model", "a+b", "_x", ".hidden", "-x", ".", "..", "a/b", "a\\b", "tiny\n", "é", "caf\u00e9",
             "x\u00b2", "a:b", None, 3]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_model_names_that_follow_the_rule(name):
    assert mr.is_model_name(name)
    assert mr.check_model_name(name) == name


@pytest.mark.parametrize("name", BAD_NAMES)
def test_model_names_that_break_the_rule_are_named_with_the_rule(name):
    assert not mr.is_model_name(name)
    with pytest.raises(ConfigError) as info:
        mr.check_model_name(name, "--name")
    message = str(info.value)
    assert message.startswith(f"--name {name!r} is not a model name") and mr.NAME_RULE in message
    assert "\n" not in message


# -- versions ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "number"), [
    ("1", 1), ("12", 12), ("007", 7),  # asked-for versions may carry leading zeros
    ("0", None), ("00", None), ("-1", None), ("+1", None), ("1.0", None), ("", None), (" 1", None), ("1\n", None),
    ("\u00b2", None), ("\u0661", None), ("\uff11", None),  # '²', Arabic-Indic one, fullwidth one: isdigit() says yes
    ("latest", None), (None, None), (1, None),
])
def test_parse_version(text, number):
    assert mr.parse_version(text) == number


@pytest.mark.parametrize(("name", "ok"), [("1", True), ("10", True), ("987", True), ("01", False), ("0", False),
                                          ("\u00b2", False), ("1a", False), ("", False), ("1\n", False)])
def test_version_folder_names(name, ok):
    assert mr.is_version_folder(name) is ok


def test_check_version():
    assert mr.check_version(3) == 3 and mr.check_version("4") == 4
    for bad in (0, -2, True, "0", "\u00b2", "x", 1.5, None):
        with pytest.raises(ConfigError, match=r"--version must be a whole number >= 1 in ASCII digits, got"):
            mr.check_version(bad)


# -- a repository on disk ---------------------------------------------------------------------------------------------

def _model(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / mr.MODEL_FILE).write_bytes(b"onnx")
    return folder / mr.MODEL_FILE


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "models"
    for v in ("1", "3", "\u00b2", "01", "0"):
        _model(root / "tiny" / v)
    (root / "tiny" / "2").mkdir()  # a version folder without a model file (a failed copy, say)
    (root / "tiny" / "notes").mkdir()
    _model(root / "bad name" / "1")
    _model(root / ".hidden" / "1")
    (root / "empty").mkdir()
    _model(tmp_path / "elsewhere" / "1")
    (root / "outside").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "README").write_text("a file, not a model")
    return root


def test_versions_of_a_model(repo):
    tiny = repo / "tiny"
    assert mr.version_folders(tiny) == [(1, tiny / "1"), (2, tiny / "2"), (3, tiny / "3")]
    assert mr.versions(tiny) == [1, 3]  # 2 has no model file; '²', '01' and '0' are no versions
    assert mr.next_version(tiny) == 4  # past every version folder, with a model file or not
    assert mr.next_version(repo / "new-model") == 1 and mr.versions(repo / "new-model") == []


def test_where_a_model_version_lies(repo):
    assert mr.version_folder(repo, "tiny", 5) == repo / "tiny" / "5"
    assert mr.version_folder(repo, "tiny", "5") == repo / "tiny" / "5"
    assert mr.model_path(repo, "tiny") == repo / "tiny" / "3" / "model.onnx"  # the newest with a model file
    assert mr.model_path(repo, "tiny", 1) == repo / "tiny" / "1" / "model.onnx"
    with pytest.raises(NotFoundError, match="does not exist"):
        mr.model_path(repo, "tiny", 2)
    with pytest.raises(NotFoundError, match="holds no VERSION/model.onnx"):
        mr.model_path(repo, "empty")
    with pytest.raises(ConfigError, match="is not a model name"):
        mr.model_path(repo, "bad name")
    with pytest.raises(ConfigError, match="must be a whole number >= 1"):
        mr.version_folder(repo, "tiny", 0)
    assert mr.config_paths(repo / "tiny" / "1" / "model.onnx") == (repo / "tiny" / "1" / "config.json",
                                                                    repo / "tiny" / "1" / "model.json")


def test_which_folders_are_models(repo, tmp_path):
    found = {folder.name: problem for folder, problem in mr.model_folders(repo)}
    assert sorted(found) == ["bad name", "empty", "outside", "tiny"]  # no hidden folder, no file
    assert found["tiny"] is None and found["empty"] is None
    assert "a model name is" in found["bad name"]
    assert "points outside the repository" in found["outside"] and str(tmp_path / "elsewhere") in found["outside"]
    assert mr.model_names(repo) == ["tiny"]  # `empty` holds no version
    assert mr.inside(repo / "tiny" / "1", repo) and not mr.inside(repo / "outside" / "1", repo)
    assert not mr.inside(repo / ".." / "elsewhere", repo)


def test_what_a_command_line_argument_names(repo):
    target = mr.resolve_target(str(repo))
    assert (target.name, target.version, target.repository) == ("tiny", "3", repo)
    assert mr.resolve_target(str(repo / "tiny")).version == "3"
    assert mr.resolve_target(str(repo / "tiny" / "1")).version == "1"
    # a file in a folder the server would skip is a lone model: no repository to serve it from
    lone = mr.resolve_target(str(repo / "bad name" / "1" / "model.onnx"))
    assert (lone.path, lone.repository) == (repo / "bad name" / "1" / "model.onnx", None)
    assert mr.resolve_target(str(repo / "outside" / "1" / "model.onnx")).repository is None
    assert mr.resolve_target(str(repo / "tiny" / "01" / "model.onnx")).repository is None
    with pytest.raises(NotFoundError, match="has no model 'outside'; it holds tiny"):
        mr.resolve_target(str(repo), "outside")
    assert mr.model_file(str(repo / "tiny")) == repo / "tiny" / "3" / "model.onnx"
    assert mr.model_file("no-such-thing") == mr.Path("no-such-thing")
    with pytest.raises(PonderError, match="holds no exported model"):
        mr.resolve_target(str(repo / "empty"))


def test_the_old_homes_still_export_the_names():
    from ponder.serve import bench

    assert bench.resolve_target is mr.resolve_target and bench.model_file is mr.model_file
    assert bench.Target is mr.Target and bench.versions_in is mr.versions


# -- export and serve agree -------------------------------------------------------------------------------------------

def _cli(capsys, *args: str) -> tuple[int, str, str]:
    from ponder.cli import main

    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    finally:
        signal.signal(signal.SIGTERM, sigterm)  # main() makes SIGTERM unwind; leave pytest's handling as it was
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from ponder.config import load_config
    from ponder.train import Trainer

    folder = tmp_path_factory.mktemp("repo-run")
    Trainer(load_config(write_tiny_config(folder, steps=4)), folder / "run", progress=False).train()
    return folder / "run"


@pytest.mark.parametrize("name", ["my model", "a+b", "_x"])
def test_export_refuses_a_name_serve_would_skip(capsys, tmp_path, checkpoint, name):
    repo = tmp_path / "models"
    code, out, err = _cli(capsys, "export", str(checkpoint), "--repository", str(repo), "--name", name,
                          "--skip-check")
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("ponder: error:")]
    assert errors == [f"ponder: error: --name {name!r} is not a model name: use {mr.NAME_RULE} (a model name is a "
                      "folder name and appears in request URLs and metric labels)"], err
    assert not repo.exists()  # nothing written, not even the repository folder


def test_a_name_export_accepts_is_served(capsys, tmp_path, checkpoint):
    from ponder.serve.repository import Repository

    repo = tmp_path / "models"
    code, out, err = _cli(capsys, "export", str(checkpoint), "--repository", str(repo), "--name", "my-model.v2",
                          "--skip-check", "--compaction", "off")
    assert code == 0, err
    assert (repo / "my-model.v2" / "1" / "model.onnx").is_file()
    served = Repository(repo, threads=1)
    assert list(served.models) == ["my-model.v2"]
    version = served.find("my-model.v2")
    assert version.ready and version.version == "1" and version.error is None
    assert served.find("my-model.v2", "001") is version  # a request may write the version with leading zeros
    with pytest.raises(NotFoundError):
        served.find("my-model.v2", "2")
    target = mr.resolve_target(str(repo))  # what `ponder bench` finds there is what the server serves
    assert (target.name, target.version, target.repository) == ("my-model.v2", "1", repo)
    assert mr.next_version(repo / "my-model.v2") == 2
