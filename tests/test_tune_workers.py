"""The ACT tuner with several workers on one storage: one study shared, claims raced, stale and dying workers,
interrupted workers, Pareto search in parallel."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import TINY_TUNER as TINY
from helpers import tiny_tuner as _tuner

pytestmark = pytest.mark.usefixtures("one_thread")


# -- several workers on one storage -----------------------------------------------------------------------------


def _trials_by_cell(url, name):
    """``{(threshold, lambda): [trial, ...]}`` of every grid trial in the study, and the study's trials."""
    import optuna

    trials = optuna.load_study(study_name=name, storage=url).trials
    by_cell: dict[tuple, list] = {}
    for t in trials:
        by_cell.setdefault((t.params["threshold"], t.params["lambda"]), []).append(t)
    return by_cell, trials


def _assert_each_cell_complete_once(url, name, cells):
    from optuna.trial import TrialState

    by_cell, trials = _trials_by_cell(url, name)
    assert set(by_cell) == set(cells)
    for cell, ts in by_cell.items():
        assert [t.state for t in ts].count(TrialState.COMPLETE) == 1, (cell, [t.state.name for t in ts])
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    return by_cell, trials


def _table(results):
    return sorted((r["threshold"], r["lambda"], r["final_val_perplexity"], r["avg_layers_executed"])
                  for r in results["all_results"])


def test_two_cli_workers_share_one_sqlite_study(corpus, tmp_path):
    """Two real `ponder tune` processes on one SQLite file: every cell computed once, both print the whole table."""
    import os

    from optuna.trial import TrialState

    url, name = f"sqlite:///{tmp_path / 'tune.db'}", "shared"
    thresholds, lambdas = [0.5, 0.9, 0.99], [0.001, 0.1]
    args = ["--mode", "full", "--thresholds", *map(str, thresholds), "--lambdas", *map(str, lambdas), "--epochs", "1",
            "--d-model", "16", "--n-layers", "3", "--seq-len", "16", "--steps", "2", "--eval-batches", "2",
            "--batch-size", "4", "--data", str(corpus), "--no-progress", "--storage", url, "--study-name", name]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PONDER_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH="")
    procs = [subprocess.Popen([sys.executable, "-m", "ponder", "tune", *args, "--output-dir", str(tmp_path / f"w{i}")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in (0, 1)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    cells = [(t, lam) for lam in lambdas for t in thresholds]
    by_cell, trials = _assert_each_cell_complete_once(url, name, cells)
    for t in trials:  # a claim that lost names the trial it duplicated, which holds the same cell
        if t.state == TrialState.FAIL:
            winner = trials[t.user_attrs["duplicate_of"]]
            assert winner.number < t.number and winner.params == t.params
    reports = [json.loads((tmp_path / f"w{i}" / "act_tuning_results.json").read_text()) for i in (0, 1)]
    assert sum(r["cells_computed_here"] for r in reports) == len(cells)
    assert sum(r["n_trainings"] for r in reports) == len(cells)  # full mode: a training per cell, none twice
    assert _table(reports[0]) == _table(reports[1]) and len(reports[0]["all_results"]) == len(cells)
    assert reports[0]["best_config"] == reports[1]["best_config"]
    assert outs[0][0].splitlines()[:-1] == outs[1][0].splitlines()[:-1]  # the same table on both stdouts
    for i in (0, 1):
        assert (tmp_path / f"w{i}" / "act_tuning_heatmap.png").exists()


def _workers(n, work, limit=60.0):
    """Run ``work(i, start)`` in ``n`` threads; each calls ``start()`` when ready, and they go on together.
    Returns their results, re-raising the first error; a worker still running after ``limit`` s fails the test
    (a worker that waits forever for a cell nobody computes) instead of hanging it."""
    import threading
    import time


    torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())  # its first use imports for seconds: not in a race
    out, errors, barrier = [None] * n, [], threading.Barrier(n, timeout=60)

    def run(i):
        try:
            out[i] = work(i, barrier.wait)
        except BaseException as e:  # noqa: B036 - handed to the test thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + limit
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), f"a worker still runs after {limit} s"
    return out


def test_two_sweep_workers_train_each_lambda_once(corpus, tmp_path):
    from ponder.tune import make_loaders

    url, name = f"sqlite:///{tmp_path / 'tune.db'}", "sweep"
    thresholds, lambdas = [0.5, 0.99], [0.0, 0.01, 0.1]
    tuners = []

    def work(i, start):
        train, val, vocab = make_loaders(corpus, batch_size=4, n_seq=TINY["n_seq"])
        tuner = _tuner(vocab)
        tuner.poll_interval = 0.1
        tuners.append(tuner)
        start()
        return tuner.grid_search(train, val, thresholds, lambdas, num_epochs=1, storage=url, study_name=name)

    reports = _workers(2, work)
    assert sum(t.n_trainings for t in tuners) == len(lambdas)  # one training per lambda across both workers
    assert sum(r["cells_computed_here"] for r in reports) == len(thresholds) * len(lambdas)
    assert _table(reports[0]) == _table(reports[1]) and len(reports[0]["all_results"]) == 6
    _assert_each_cell_complete_once(url, name, [(t, lam) for lam in lambdas for t in thresholds])


def test_claim_race_lowest_number_wins(tmp_path):
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    from ponder.tune.claims import create_claim, resolve_claims

    url = f"sqlite:///{tmp_path / 'claims.db'}"
    optuna.create_study(study_name="c", storage=url)
    one, two = (optuna.load_study(study_name="c", storage=url) for _ in range(2))  # two workers' handles

    def claim(study, t=0.5, mode="full"):
        return create_claim(study, create_trial(
            state=TrialState.RUNNING, params={"threshold": t, "lambda": 0.01},
            distributions={"threshold": CategoricalDistribution([0.5, 0.9]),
                           "lambda": CategoricalDistribution([0.01])},
            user_attrs={"mode": mode, "seeds": 1}))

    first, second = claim(one), claim(two)  # both created before either looks: each sees the other
    assert resolve_claims(two, [second]) == {second: False}  # the later one looks first, and still loses
    assert resolve_claims(one, [first]) == {first: True}
    lost = two._storage.get_trial(second)
    assert lost.state == TrialState.FAIL and lost.user_attrs["duplicate_of"] == 0
    # another cell (threshold, or mode) is not contested
    other, sweep = claim(two, t=0.9), claim(two, mode="sweep")
    assert resolve_claims(two, [other, sweep]) == {other: True, sweep: True}
    # once the winner's claim is FAIL (its worker died) the next claim on the cell wins
    one._storage.set_trial_state_values(first, TrialState.FAIL)
    again = claim(two)
    assert resolve_claims(two, [again]) == {again: True}
    assert one._storage.get_trial(again).number > lost.number


def _running_claim(url, name, cell, thresholds, lambdas):
    """A RUNNING claim on ``cell`` as another worker would leave it (full mode, the grid's distributions),
    and its storage (heartbeat 1 s)."""
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    from ponder.tune.claims import create_claim, open_storage

    storage = open_storage(url, heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True)
    trial_id = create_claim(study, create_trial(
        state=TrialState.RUNNING, params={"threshold": cell[0], "lambda": cell[1]},
        distributions={"threshold": CategoricalDistribution(thresholds), "lambda": CategoricalDistribution(lambdas)},
        user_attrs={"mode": "full", "seeds": 1}))
    storage.record_heartbeat(trial_id)
    return storage, trial_id


def test_stale_claim_is_failed_and_redone(loaders, tmp_path):
    import time

    from optuna.trial import TrialState

    train, val, vocab = loaders
    url, name = f"sqlite:///{tmp_path / 'tune.db'}", "stale"
    storage, stale = _running_claim(url, name, (0.5, 0.001), [0.5], [0.001, 0.1])
    time.sleep(2.5)  # its worker is gone: no heartbeat for longer than the grace period
    tuner = _tuner(vocab)
    [res] = _workers(1, lambda i, start: tuner.grid_search(train, val, [0.5], [0.001, 0.1], num_epochs=1, mode="full",
                                                           storage=url, study_name=name, heartbeat_interval=1,
                                                           grace_period=1))
    assert storage.get_trial(stale).state == TrialState.FAIL
    assert res["cells_computed_here"] == 2 and res["resumed_trials"] == 0 and tuner.n_trainings == 2
    _assert_each_cell_complete_once(url, name, [(0.5, 0.001), (0.5, 0.1)])


def test_waiting_worker_takes_over_a_claim_that_dies(loaders, tmp_path, capfd):
    """A live claim makes the worker wait; once its worker stops beating the waiting worker computes the cell."""
    import threading
    import time

    import optuna
    from optuna.trial import TrialState

    train, val, vocab = loaders
    url, name = f"sqlite:///{tmp_path / 'tune.db'}", "takeover"
    storage, claim = _running_claim(url, name, (0.5, 0.1), [0.5], [0.001, 0.1])
    alive = threading.Event()
    alive.set()

    def other_worker():  # beats until the worker under test has done its own cell, then dies
        while alive.is_set():
            storage.record_heartbeat(claim)
            time.sleep(0.3)

    def watch():
        while not any(t.state == TrialState.COMPLETE
                      for t in optuna.load_study(study_name=name, storage=url).trials):
            time.sleep(0.2)
        time.sleep(1.0)  # long enough for the worker to find nothing free and start waiting
        alive.clear()

    threads = [threading.Thread(target=other_worker, daemon=True), threading.Thread(target=watch, daemon=True)]
    for t in threads:
        t.start()
    tuner = _tuner(vocab)
    tuner.poll_interval = 0.2
    [res] = _workers(1, lambda i, start: tuner.grid_search(train, val, [0.5], [0.001, 0.1], num_epochs=1, mode="full",
                                                           storage=url, study_name=name, heartbeat_interval=1,
                                                           grace_period=1))
    assert not alive.is_set()  # it waited for the claim's worker to die rather than duplicating its cell
    assert "waiting for 1 cell that other workers are running" in capfd.readouterr().err
    assert storage.get_trial(claim).state == TrialState.FAIL
    assert res["cells_computed_here"] == 2 and len(res["all_results"]) == 2
    _assert_each_cell_complete_once(url, name, [(0.5, 0.001), (0.5, 0.1)])


def test_interrupted_worker_gives_its_claims_back(loaders, tmp_path):
    from optuna.trial import TrialState

    train, val, vocab = loaders
    url, name = f"sqlite:///{tmp_path / 'tune.db'}", "ctrl-c"
    tuner = _tuner(vocab)
    calls = []
    real = tuner._train_and_eval

    def interrupted_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    tuner._train_and_eval = interrupted_on_second
    with pytest.raises(KeyboardInterrupt):
        tuner.grid_search(train, val, [0.5, 0.99], [0.01], num_epochs=1, mode="full", storage=url, study_name=name)
    by_cell, _ = _trials_by_cell(url, name)
    assert [t.state for t in by_cell[(0.5, 0.01)]] == [TrialState.COMPLETE]
    [claim] = by_cell[(0.99, 0.01)]
    assert claim.state == TrialState.FAIL and "KeyboardInterrupt" in claim.user_attrs["interrupted"]
    again = _tuner(vocab)  # a restart redoes the cell at once, without waiting for a heartbeat to expire
    res = again.grid_search(train, val, [0.5, 0.99], [0.01], num_epochs=1, mode="full", storage=url, study_name=name)
    assert res["resumed_trials"] == 1 and res["cells_computed_here"] == 1 and again.n_trainings == 1
    _assert_each_cell_complete_once(url, name, [(0.5, 0.01), (0.99, 0.01)])


def test_two_pareto_workers_run_n_trials_in_all(corpus, tmp_path):
    import optuna
    from optuna.trial import TrialState

    from ponder.tune import make_loaders

    url, name = f"sqlite:///{tmp_path / 'tune.db'}", "pareto"

    def work(i, start):
        train, val, vocab = make_loaders(corpus, batch_size=4, n_seq=TINY["n_seq"])
        tuner = _tuner(vocab)
        tuner.poll_interval = 0.1
        start()
        return tuner.pareto_search(train, val, n_trials=3, num_epochs=1, storage=url, study_name=name)

    reports = _workers(2, work)
    trials = optuna.load_study(study_name=name, storage=url).trials
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 3  # 3 in all, not 3 per worker
    assert all(t.user_attrs.get("surplus") for t in trials if t.state != TrialState.COMPLETE)
    assert sum(r["cells_computed_here"] for r in reports) == 3
    assert _table(reports[0]) == _table(reports[1]) and len(reports[0]["all_results"]) == 3
