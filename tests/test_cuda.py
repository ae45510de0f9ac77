"""Training and evaluation on a CUDA GPU; skipped where none is visible (CI has none)."""

from __future__ import annotations

import pytest
import torch
from helpers import write_tiny_config

from ponder import checkpoint
from ponder.config import load_config
from ponder.evaluate import evaluate_checkpoint
from ponder.train import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")


def test_cuda_training_matches_cpu_at_the_start_and_learns(tmp_path):
    cfg = write_tiny_config(tmp_path, steps=40)
    cpu = Trainer(load_config(cfg), tmp_path / "cpu", progress=False, device="cpu")
    gpu = Trainer(load_config(cfg), tmp_path / "gpu", progress=False, device="cuda")
    assert gpu.device.type == "cuda" and next(gpu.model.parameters()).is_cuda
    x, y = cpu._batch(0)
    loss_cpu = cpu.model(x, y).loss.item()
    loss_gpu = gpu.model(x.cuda(), y.cuda()).loss.item()
    assert loss_gpu == pytest.approx(loss_cpu, rel=1e-3)
    before = gpu.validate()["loss"]
    after = gpu.train()["loss"]
    assert after < before - 0.3


def test_cuda_checkpoint_resumes_on_cuda_and_loads_on_cpu(tmp_path):
    cfg = write_tiny_config(tmp_path, steps=8)
    Trainer(load_config(cfg), tmp_path / "run", progress=False, device="cuda", steps=4).train()
    resumed = Trainer(None, tmp_path / "run", resume=True, progress=False, steps=8, device="cuda")
    assert resumed.step == 4 and resumed.device.type == "cuda"
    resumed.train()
    model, _, _ = checkpoint.load_model(tmp_path / "run")
    assert not next(model.parameters()).is_cuda
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name].cpu()), name
    results = evaluate_checkpoint(str(tmp_path / "run"), [0.5, 1.0])
    assert results[1]["layers_executed"] == 3
