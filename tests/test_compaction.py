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

    def counting(cls, halted, n, mask, rows=None):
        calls.append(n)
        return real(cls, halted, n, mask, rows)

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


@pytest.mark.parametrize("halting", HALTING)
@pytest.mark.parametrize("mode", ["off", "on"])
def test_a_padded_batch_at_a_threshold_per_row_gives_each_row_alone(halting, mode):
    """The forward's ``threshold`` tensor (one per row) and ``lengths`` (right padding): every halting rule
    broadcasts the per-row threshold, dense and over compacted rows; padding starts halted and runs no layer."""
    model = tiny("rmsnorm", halting, n_layers=3)
    model.compaction = mode
    ids = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(3))
    lengths, thresholds = [12, 7, 3, 5], [0.9, 0.05, 1.0, 0.5]
    with torch.no_grad():
        batch = model(ids, threshold=torch.tensor(thresholds), lengths=torch.tensor(lengths))
        alone = [model(row[None, :n], threshold=t) for row, n, t in zip(ids, lengths, thresholds, strict=True)]
    for r, (n, out) in enumerate(zip(lengths, alone, strict=True)):
        assert torch.allclose(batch.logits[r, :n], out.logits[0], atol=1e-5), r
        assert torch.equal(batch.depth[r, :n], out.depth[0]) and not batch.depth[r, n:].any(), r
        assert int(batch.depth[r].max()) == out.layers_executed, r
    assert batch.layers_executed == max(out.layers_executed for out in alone)
    if halting != "fixed":
        assert len({out.layers_executed for out in alone}) > 1  # the rows' own thresholds really differ in effect


def test_a_threshold_tensor_is_checked():
    model = tiny("layernorm", "act")
    ids = samples()[0]
    with pytest.raises(ValueError, match="one per batch row"):
        model(ids, threshold=torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(Exception, match="outside"):
        model(ids, threshold=torch.tensor([0.5, 0.0]))
    with torch.no_grad():  # a scalar tensor is the float
        assert torch.equal(model(ids, threshold=torch.tensor(0.5)).depth, model(ids, threshold=0.5).depth)


def test_rows_whose_tokens_have_all_halted_take_no_part():
    """Keys and values at a compacted layer only for the batch rows with a running token: a finished row is left
    out of the step (its state comes back untouched) and the others get what the dense step gives."""
    halted = torch.tensor([[True, True, True, True], [True, False, True, False], [True, True, True, True],
                           [False, True, True, True]])
    mask = torch.ones(2, 4, 4, dtype=torch.bool).tril()
    rows = Rows.running(halted, 2, mask, rows=2)
    assert sorted(rows.active.tolist()) == [1, 3] and rows.pos.shape == (2, 2) and rows.mask.shape == (2, 2, 2, 4)
    state = torch.arange(16.0).view(4, 4)
    taken = rows.take(state)
    by_row = {int(a): set(r) for a, r in zip(rows.active, taken.tolist(), strict=True)}
    assert by_row[1] == {5.0, 7.0} and 12.0 in by_row[3]  # row 3's one running token, padded with a halted one
    assert torch.equal(rows.take_local(rows.batch(state.view(4, 4, 1))).view(2, 2), taken)
    assert torch.equal(rows.put(state, taken), state)

    model = tiny("layernorm", "act", n_layers=3)
    ids = torch.randint(0, 40, (4, 10), generator=torch.Generator().manual_seed(5))
    thresholds = torch.tensor([1.0, 0.01, 0.01, 0.9])  # rows 1 and 2 stop after layer 0; rows 0 and 3 go on
    calls = []
    real = Rows.running.__func__

    def counting(cls, halted, n, mask, rows=None):
        calls.append(rows)
        return real(cls, halted, n, mask, rows)

    with torch.no_grad():
        dense = _run(model, ids, "off", thresholds)
        Rows.running = classmethod(counting)
        try:
            out = _run(model, ids, "on", thresholds)
        finally:
            Rows.running = classmethod(real)
    assert calls and max(calls) == 2  # two of four rows took part in every compacted layer
    assert torch.allclose(out.logits, dense.logits, atol=1e-5) and torch.equal(out.depth, dense.depth)
