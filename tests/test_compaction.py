"""Compaction in PyTorch inference: a layer computed for its running tokens only gives what the
dense layer gives (the exported graph's parity is in test_export.py)."""

from __future__ import annotations

import pytest
import torch
from test_export import HALTING, NORMS, samples, tiny

from ponder.model import Rows


def _run(model, ids, mode, threshold, cutoff=None):
    model.compaction = mode
    if cutoff is not None:
        model.compaction_cutoff = cutoff
    with torch.no_grad():
        return model(ids, ids, threshold=threshold)


@pytest.mark.parametrize("halting", HALTING)
@pytest.mark.parametrize("norm", NORMS)
def test_compacted_eval_matches_dense_for_every_norm_and_halting_plugin(norm, halting):
    model = tiny(norm, halting)
    for ids in samples():
        for threshold in (0.05, 0.5, 0.9, 1.0):
            dense = _run(model, ids, "off", threshold)
            for mode in ("on", "auto"):
                out = _run(model, ids, mode, threshold)
                assert torch.allclose(out.logits, dense.logits, atol=1e-5)
                assert out.layers_executed == dense.layers_executed and torch.equal(out.depth, dense.depth)
                assert torch.allclose(out.loss, dense.loss, atol=1e-5)  # PonderNet's per-layer task loss too


def _count_compactions(monkeypatch) -> list[int]:
    calls = []
    real = Rows.running.__func__

    def counting(cls, halted, n, mask):
        calls.append(n)
        return real(cls, halted, n, mask)

    monkeypatch.setattr(Rows, "running", classmethod(counting))
    return calls


def test_auto_compacts_only_below_the_cutoff_and_never_in_training(monkeypatch):
    model = tiny("layernorm", "act")
    ids = samples()[0]
    calls = _count_compactions(monkeypatch)
    with torch.no_grad():
        running = (~model(ids, threshold=0.9).depth.eq(1)).sum(1).max().item()  # rows layer 1 would compute
    calls.clear()
    share = running / ids.shape[1]
    assert 0 < share < 1
    _run(model, ids, "auto", 0.9, cutoff=share)  # at the cutoff: compacted
    assert calls == [running]
    _run(model, ids, "auto", 0.9, cutoff=share - 1e-3)  # just above it: dense
    assert calls == [running]
    _run(model, ids, "on", 1.0)  # nothing has halted: "on" compacts all rows anyway, after layer 0
    assert calls == [running, ids.shape[1]]
    model.train()
    model.compaction = "on"
    model(ids, ids, threshold=0.9).loss.backward()  # training: always dense
    assert calls == [running, ids.shape[1]]
