"""Shared fixtures: real third-party plugin distributions, installed once per session."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY_TUNER

DISTS = Path(__file__).parent / "plugin_dists"

# Tests that export a model (the dynamo exporter takes 20-40 s each) start first, so the two xdist workers end
# together on the many short tests instead of one waiting while the other finishes a long export.
LONG_FIRST = ("test_export.py", "test_demo.py", "test_examples.py", "test_distributed.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in LONG_FIRST)  # stable: the order within each group stays


@pytest.fixture(scope="session")
def plugin_dists(tmp_path_factory) -> dict[str, Path]:
    """Each distribution under tests/plugin_dists, pip-installed into its own --target folder."""
    out = {}
    for src in sorted(DISTS.iterdir()):
        target = tmp_path_factory.mktemp(src.name)
        build = tmp_path_factory.mktemp(src.name + "-src") / src.name
        shutil.copytree(src, build)  # keep build droppings out of the source tree
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
             "--no-index", "--target", str(target), str(build)],
            check=True, capture_output=True, text=True,
        )
        out[src.name] = target
    return out


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory, worker_id) -> Path:
    """A Triton-style repository for the serving tests, built from a real export of a small byte-level model:

    tiny/1 and tiny/2 (the same model), broken/1 (a file that is not ONNX), and `outside`, a link to a model
    folder outside the repository (which the server must not serve). Built once and shared by the xdist workers
    (the export takes half a minute); no test writes into it."""
    from filelock import FileLock

    if worker_id == "master":  # not under xdist: this run's own folder
        root = tmp_path_factory.mktemp("model-repository")
        _build_model_repository(root, tmp_path_factory.mktemp("model-elsewhere"))
        return root
    shared = tmp_path_factory.getbasetemp().parent  # under xdist: this run's folder, the same for every worker
    root = shared / "model-repository"
    with FileLock(str(shared / "model-repository.lock")):
        if not (shared / "model-repository.done").exists():
            _build_model_repository(root, shared / "model-elsewhere")
            (shared / "model-repository.done").touch()
    return root


def served_model():
    """The PyTorch model behind the repository's tiny/1 and tiny/2 (the same every time: seeded)."""
    import torch

    from ponder.config import ModelConfig, PluginSpec
    from ponder.model import PonderLM

    torch.manual_seed(0)
    model = PonderLM(ModelConfig(vocab_size=256, d_model=32, n_layers=3, n_heads=2, n_local_heads=1, d_ff=64,
                                 max_seq_len=32, attn_window=8.0, act_threshold=0.9),
                     norm=PluginSpec("layernorm"), halting=PluginSpec("act", {"bias_init": 1.0}))
    with torch.no_grad():
        model.halting.weight.normal_(0.0, 0.5)  # tokens halt at different depths at lower thresholds
    return model.eval()


def _build_model_repository(root: Path, elsewhere: Path) -> None:
    import json

    from ponder.export import export_model

    model = served_model()
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(elsewhere, ignore_errors=True)
    first = root / "tiny" / "1"
    first.mkdir(parents=True)
    export_model(model.eval(), first / "model.onnx", check=False,
                 metadata={"tokenizer": {"kind": "byte", "vocab_size": 256}})
    (first / "config.json").write_text(json.dumps({"tokenizer": {"kind": "byte"}}))
    shutil.copytree(first, root / "tiny" / "2")
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.onnx").write_bytes(b"this is not an ONNX model")
    shutil.copytree(first, elsewhere / "1")
    (root / "outside").symlink_to(elsewhere, target_is_directory=True)


# -- the tuner's tests (tests/test_tune.py, tests/test_tune_workers.py) ------------------------------------------

@pytest.fixture(scope="module")
def one_thread():
    """The tuner's tests (pytestmark): tiny matrices on busy cores, where one intra-op thread is several times
    faster than two fighting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The tuner's tests: a short text file of the embedded corpus."""
    from ponder.data import embedded_corpus

    path = tmp_path_factory.mktemp("tune") / "corpus.txt"
    path.write_text(embedded_corpus()[:12_000])
    return path


@pytest.fixture(scope="module")
def loaders(corpus):
    """The tuner's tests: train and validation loaders over ``corpus``."""
    from ponder.tune import make_loaders

    return make_loaders(corpus, batch_size=4, n_seq=TINY_TUNER["n_seq"])
