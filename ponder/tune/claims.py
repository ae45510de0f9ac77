"""Several ``ponder tune`` workers on one Optuna storage: each grid cell is claimed (a RUNNING trial; among the
live trials of a cell the lowest number wins) before it is computed, and a worker's claims beat through the
storage's heartbeat, so a dead worker's cells are failed and redone."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Sequence
from typing import Any

from ponder.errors import ConfigError


def quiet_optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


HEARTBEAT_INTERVAL = 30


@contextlib.contextmanager
def experimental_ok():
    """Optuna flags its heartbeat API as experimental; ponder uses it on purpose, so no warning at each call."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def open_storage(storage: Any, heartbeat_interval: int = HEARTBEAT_INTERVAL, grace_period: int | None = None) -> Any:
    """``storage`` as Optuna takes it. A database URL (``sqlite:///tune.db``, ``postgresql://``, ``mysql://``)
    becomes an ``RDBStorage`` with a heartbeat: a trial whose worker has not beaten for ``grace_period`` seconds
    (default 4 x ``heartbeat_interval``) counts as stale and is failed, so a crashed worker's cells are redone.
    ``None`` (in memory) and storage objects are passed through as they are. A URL that cannot be opened is a
    ConfigError naming it, why, and the URLs that work."""
    if not isinstance(storage, str):
        return storage
    if heartbeat_interval < 1 or (grace_period is not None and grace_period < 1):
        raise ConfigError("the heartbeat interval and grace period must be whole seconds >= 1")
    import random

    import sqlalchemy.exc

    optuna = quiet_optuna()
    for attempt in range(5):  # workers started together on a new database race to create its tables
        try:
            with experimental_ok():
                return optuna.storages.RDBStorage(storage, heartbeat_interval=int(heartbeat_interval),
                                                  grace_period=int(grace_period or 4 * heartbeat_interval))
        except (sqlalchemy.exc.NoSuchModuleError, sqlalchemy.exc.ArgumentError, ImportError, ValueError) as exc:
            raise _unopenable(storage, exc) from None  # a URL no retry can mend
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, OSError) as exc:
            if attempt == 4:
                raise _unopenable(storage, exc) from None
            time.sleep(0.2 + random.random())
    raise AssertionError("not reached")


def _unopenable(storage: str, exc: Exception) -> ConfigError:
    reason = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
    return ConfigError(f"cannot open the Optuna storage {storage!r}: {reason}; give a database URL such as "
                       "sqlite:///tune.db (a file in this folder; sqlite:////abs/path/tune.db for an absolute "
                       "path) or postgresql://user:password@host/db (also mysql://)")


def fail_stale_claims(study) -> None:
    """Mark FAIL the RUNNING trials whose worker stopped beating (a no-op without a heartbeat storage)."""
    optuna = quiet_optuna()
    with experimental_ok():
        optuna.storages.fail_stale_trials(study)


def cell_of(trial) -> tuple | None:
    """A grid trial's cell: ``(threshold, lambda, mode, seeds)``; None for any other trial."""
    p, u = trial.params, trial.user_attrs
    if "threshold" not in p or "lambda" not in p or "mode" not in u or "seeds" not in u:
        return None
    return (p["threshold"], p["lambda"], u["mode"], u["seeds"])


def holds_cell(trial) -> bool:
    """A RUNNING claim, or a COMPLETE trial with its result: the trials that hold a cell."""
    return trial.state.name == "RUNNING" or (trial.state.name == "COMPLETE" and "result" in trial.user_attrs)


def create_claim(study, template) -> int:
    """Create ``template`` (a RUNNING trial of one cell) in ``study``; returns its trial id. The storage numbers
    trials in one locked transaction, so trial numbers follow the order the claims were committed in."""
    return study._storage.create_new_trial(study._study_id, template_trial=template)


def resolve_claims(study, trial_ids: Sequence[int]) -> dict[int, bool]:
    """``{trial_id: won}`` for claims this worker created. Among the RUNNING or COMPLETE trials of a cell, the
    lowest number wins; a losing claim is marked FAIL, its user attr ``duplicate_of`` naming the winner.

    Race-free because claims are committed one at a time (the storage locks the study to number a trial)
    and a worker reads the trials only after its own claim is committed: of two claims on one cell, the
    later one's creator always sees the earlier one, so it cannot also win while the earlier one is alive.
    The earlier one's creator may or may not see the later claim; either way the later number loses. A
    claim that turns FAIL (its worker died or was interrupted) stops holding the cell, and the next claim
    wins, so a cell is COMPLETE at most once: a FAIL trial can no longer be finished."""
    optuna = quiet_optuna()
    storage = study._storage
    live = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,
                                                    optuna.trial.TrialState.COMPLETE))
    holder: dict[tuple, int] = {}
    for t in live:  # sorted by number: the first trial seen of a cell is its lowest
        cell = cell_of(t)
        if cell is not None and holds_cell(t):
            holder.setdefault(cell, t.number)
    won = {}
    for trial_id in trial_ids:
        mine = storage.get_trial(trial_id)
        winner = holder.get(cell_of(mine), mine.number)
        won[trial_id] = winner == mine.number
        if not won[trial_id]:
            try:
                storage.set_trial_user_attr(trial_id, "duplicate_of", winner)
                storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # already failed (as stale): it holds nothing either way
    return won


class Heartbeat:
    """Beats for the trials this worker holds, every ``heartbeat_interval`` seconds, from a daemon thread;
    nothing at all when the storage has no heartbeat."""

    def __init__(self, storage) -> None:
        import threading

        get_interval = getattr(storage, "get_heartbeat_interval", None)
        self.interval = get_interval() if get_interval is not None else None
        self.storage, self.held = storage, set()
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = (threading.Thread(target=self._run, name="ponder-tune-heartbeat", daemon=True)
                        if self.interval else None)

    def _beat(self, trial_id: int) -> None:
        try:
            self.storage.record_heartbeat(trial_id)
        except Exception:  # a busy database: the next beat comes within the grace period
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                held = list(self.held)
            for trial_id in held:
                self._beat(trial_id)

    def __enter__(self) -> Heartbeat:
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def hold(self, trial_id: int) -> None:
        with self._lock:
            self.held.add(trial_id)
        if self.interval:
            self._beat(trial_id)  # at once: a claim that never beat is never found stale

    def release(self, trial_id: int) -> None:
        with self._lock:
            self.held.discard(trial_id)

    def fail_held(self, reason: str) -> None:
        """Mark FAIL every claim still held (an exception or Ctrl-C), so a restarted run redoes them at once."""
        optuna = quiet_optuna()
        with self._lock:
            held, self.held = list(self.held), set()
        for trial_id in held:
            try:
                self.storage.set_trial_user_attr(trial_id, "interrupted", reason)
                self.storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
            except Exception:
                pass
