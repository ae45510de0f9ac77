"""The model repository, laid out like Triton's: ``ROOT/NAME/VERSION/model.onnx``, a ``config.json`` beside it.

The one owner of that layout and its rules: what a model name is, what a version folder is, which versions a model
has and which comes next, where a model's version lies, and which folders count at all (one that resolves outside
ROOT, through a link, does not). ``ponder export`` writes by these rules, ``ponder serve`` serves by them, and
``ponder bench``, ``demo``, ``inspect``, ``run`` and ``tokenize`` find models by them, so a name export accepts is
a name serve serves.

Torch-free and numpy-free: importing it costs nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ponder.errors import ConfigError, NotFoundError, PonderError

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.json"  # beside the model file: the tokenizer and the serving defaults
DECODE_FILE = "decode.onnx"  # beside model.onnx: the decode graph (generation through a KV cache)
STAGING_PREFIX = ".tmp-"  # a version being written: NAME/.tmp-VERSION-XXXX, renamed to NAME/VERSION when complete

# A model's name is its folder's name, and it also appears in request URLs and metric labels, so it is kept to
# ASCII letters, digits, '_', '.' and '-', starting with a letter or a digit (which also rules out hidden folders,
# '.' and '..'). Matched whole (fullmatch): a trailing newline is no loophole.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
NAME_RULE = "ASCII letters, digits, '_', '.' and '-', starting with a letter or a digit"

# A version folder's name: a whole number >= 1 in ASCII digits, without leading zeros (Triton ignores those too), so
# a version number and its folder name are one and the same. Not str.isdigit(): it accepts '²' and other digits.
VERSION_FOLDER = re.compile(r"[1-9][0-9]*")
VERSION_RULE = "a whole number >= 1 in ASCII digits"


# -- names and versions ------------------------------------------------------------------------------------------

def is_model_name(name: object) -> bool:
    """Whether ``name`` follows the model name rule (:data:`NAME_RULE`)."""
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None


def check_model_name(name: object, what: str = "--name") -> str:
    """``name`` if it is a model name, else a ConfigError naming it, ``what`` gave it, and the rule."""
    if not is_model_name(name):
        raise ConfigError(f"{what} {name!r} is not a model name: use {NAME_RULE} (a model name is a folder name "
                          "and appears in request URLs and metric labels)")
    return name  # type: ignore[return-value]


def parse_version(text: object) -> int | None:
    """The version ``text`` names (ASCII digits, a number >= 1; "007" names version 7), or None when it names none.

    For versions someone asks for (a request, a command line); a version *folder* is named without leading zeros
    (:func:`is_version_folder`)."""
    if not isinstance(text, str) or not text.isascii() or not text.isdigit():
        return None
    try:
        number = int(text)
    except ValueError:  # more digits than int() reads
        return None
    return number if number >= 1 else None


def is_version_folder(name: str) -> bool:
    """Whether a folder called ``name`` is a version folder: a number >= 1 in ASCII digits, no leading zeros."""
    return VERSION_FOLDER.fullmatch(name) is not None


def check_version(value: object, what: str = "--version") -> int:
    """``value`` (an int, or a string of digits) as a version number, or a ConfigError naming ``what``."""
    number = value if isinstance(value, int) and not isinstance(value, bool) else parse_version(value)
    if not isinstance(number, int) or number < 1:
        raise ConfigError(f"{what} must be {VERSION_RULE}, got {value!r}")
    return number


# -- what lies where ---------------------------------------------------------------------------------------------

def resolved(path: str | Path) -> Path | None:
    """``path`` with its links followed, or None when they cannot be (a loop, a path too long)."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):  # RuntimeError: a link loop (Python < 3.13)
        return None


def outside_problem(path: str | Path, root: str | Path) -> str | None:
    """Why ``path`` does not resolve to ``root`` or somewhere under it (None: it does)."""
    target = resolved(path)
    if target is None:
        return "its links cannot be followed (a loop?)"
    if not target.is_relative_to(Path(root).resolve()):
        return f"it points outside the repository ({target})"
    return None


def inside(path: str | Path, root: str | Path) -> bool:
    """Whether ``path`` resolves (links followed) to ``root`` or somewhere under it (a link loop does not)."""
    return outside_problem(path, root) is None


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:  # not a folder, gone, or unreadable: nothing in it counts
        return []


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # unreadable: not a folder the repository can use
        return False


def _dangling(path: Path) -> bool:
    """Whether ``path`` is a link that leads nowhere (its target gone, or a loop)."""
    try:
        return path.is_symlink() and not path.exists()
    except OSError:
        return True


def version_folders(model_folder: str | Path) -> list[tuple[int, Path]]:
    """``(version, folder)`` for every version folder of a model, oldest first, with a model file in it or not."""
    found = []
    for child in _children(Path(model_folder)):
        number = parse_version(child.name) if is_version_folder(child.name) else None
        if number is not None and _is_dir(child):
            found.append((number, child))
    return sorted(found)


def skipped_entries(model_folder: str | Path) -> list[tuple[Path, str]]:
    """The entries of a model folder that are no version folders (hidden ones left out), each with why: for the
    server to report what it ignores."""
    skipped = []
    for child in _children(Path(model_folder)):
        if child.name.startswith("."):
            continue
        if not is_version_folder(child.name) or parse_version(child.name) is None:
            skipped.append((child, f"a version folder's name is {VERSION_RULE}, without leading zeros"))
        elif not _is_dir(child):
            skipped.append((child, "a version is a folder; this is not one (or a link to nothing)"))
    return skipped


def versions(model_folder: str | Path) -> list[int]:
    """The versions of a model that hold a model file, oldest first."""
    return [number for number, folder in version_folders(model_folder) if (folder / MODEL_FILE).is_file()]


def next_version(model_folder: str | Path) -> int:
    """The version a new export takes: one past the highest version folder (model file or not: a number is never
    reused), 1 for a new model."""
    return max((number for number, _ in version_folders(model_folder)), default=0) + 1


def version_folder(root: str | Path, name: str, version: int | str) -> Path:
    """``ROOT/NAME/VERSION``: where version ``version`` of model ``name`` lies (or will); the name and the version
    are checked against the rules."""
    return Path(root) / check_model_name(name, "model name") / str(check_version(version, "model version"))


def model_path(root: str | Path, name: str, version: int | str | None = None) -> Path:
    """The model file of version ``version`` of model ``name`` under ``root`` (None: the newest that has one); a
    NotFoundError when there is no such file."""
    folder = Path(root) / check_model_name(name, "model name")
    if version is None:
        found = versions(folder)
        if not found:
            raise NotFoundError(f"{str(folder)!r} holds no VERSION/{MODEL_FILE}")
        version = found[-1]
    path = version_folder(root, name, version) / MODEL_FILE
    if not path.is_file():
        raise NotFoundError(f"model file {str(path)!r} does not exist")
    return path


def lone_config_path(model: str | Path) -> Path:
    """Where the serving config of a model file outside a repository lies: ``MODEL.json`` beside ``MODEL.onnx``."""
    return Path(model).with_suffix(".json")


def decode_path(model: str | Path) -> Path:
    """Where the decode graph of a model file lies: ``decode.onnx`` beside ``model.onnx`` (in a repository),
    ``MODEL.decode.onnx`` beside any other ``MODEL.onnx``."""
    model = Path(model)
    return model.with_name(DECODE_FILE if model.name == MODEL_FILE else f"{model.stem}.decode.onnx")


def config_paths(model: str | Path) -> tuple[Path, Path]:
    """Where a model file's serving config (its tokenizer, its defaults) may lie, in the order to read them:
    ``config.json`` beside it (in a repository), then ``MODEL.json`` (beside a lone model file)."""
    return Path(model).parent / CONFIG_FILE, lone_config_path(model)


def model_problem(folder: str | Path, root: str | Path) -> str | None:
    """What keeps ``folder``, directly under ``root``, from being a model of the repository (None: nothing): a name
    against the rule, or a folder or link that resolves outside ROOT. (It may still hold no version.)"""
    folder = Path(folder)
    if not is_model_name(folder.name):
        return f"a model name is {NAME_RULE}"
    if not _is_dir(folder):
        return "it is a link to nothing (its target is gone, or the links loop)"
    return outside_problem(folder, root)


def model_folders(root: str | Path) -> list[tuple[Path, str | None]]:
    """Every folder directly under ``root``, and every link there that leads nowhere (hidden ones left out), by
    name, each with :func:`model_problem`'s answer."""
    return [(folder, model_problem(folder, root)) for folder in sorted(Path(root).iterdir())
            if (_is_dir(folder) or _dangling(folder)) and not folder.name.startswith(".")]


def model_names(root: str | Path) -> list[str]:
    """The models of the repository at ``root`` that hold a version with a model file, by name."""
    return [folder.name for folder, problem in model_folders(root) if problem is None and versions(folder)]


# -- what a command-line argument names --------------------------------------------------------------------------

@dataclass
class Target:
    """A model a command names: a name (its folder in a repository, or a name a server knows), and where it lies."""

    name: str
    path: Path | None = None        # the local model.onnx, when there is one
    repository: Path | None = None  # its repository root, when laid out ROOT/NAME/VERSION/model.onnx
    version: str = ""               # "" means the newest


def _from_file(path: Path) -> Target:
    version, model = path.parent, path.parent.parent
    if (path.name == MODEL_FILE and is_version_folder(version.name)
            and model_problem(model, model.parent) is None):  # a model the repository's server would serve
        return Target(model.name, path, model.parent, version.name)
    return Target(path.stem, path)


def resolve_target(arg: str, model: str | None = None) -> Target:
    """A model.onnx, a version folder, a model folder (its newest version), a repository (``model`` picks one of
    its models when it holds several), or, when nothing by that name exists here, a model name on a server."""
    path = Path(arg)
    if not path.exists():
        return Target(model or arg)
    if path.is_file():
        if path.suffix != ".onnx":
            raise PonderError(f"{arg!r} is not an .onnx file; give a model.onnx, a model folder or a repository")
        return _from_file(path)
    if (path / MODEL_FILE).is_file():
        return _from_file(path / MODEL_FILE)
    if found := versions(path):
        return _from_file(path / str(found[-1]) / MODEL_FILE)
    models = model_names(path)  # not links out of the repository, nor names the server skips
    if not models:
        raise NotFoundError(f"{arg!r} holds no exported model: expected {MODEL_FILE}, VERSION/{MODEL_FILE} or "
                            f"NAME/VERSION/{MODEL_FILE} (as `ponder export --repository` writes)")
    if model is None:
        if len(models) > 1:
            raise PonderError(f"repository {arg!r} holds {len(models)} models ({', '.join(models)}): name one, "
                              f"e.g. {str(path / models[0])!r} (or --model {models[0]} where the command has it)")
        model = models[0]
    if model not in models:
        raise NotFoundError(f"repository {arg!r} has no model {model!r}; it holds {', '.join(models)}")
    return _from_file(model_path(path, model))


def model_file(arg: str) -> Path:
    """The model.onnx that ``arg`` names, found as :func:`resolve_target` finds it; ``arg`` itself when nothing by
    that name exists (the caller reports it)."""
    target = resolve_target(arg)
    return Path(arg) if target.path is None else target.path
