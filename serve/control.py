"""Which models the server serves, as Triton's ``--model-control-mode`` says: ``none`` (every model at start,
no changes), ``explicit`` (what clients load and unload, RepositoryModelLoad / RepositoryModelUnload) or ``poll``
(every model at start, then the repository re-read every ``--repository-poll-secs``: new versions in, removed ones
out).

A version is served only once it is ready: loaded and *warmed up* (run once at each batch size its scheduler will
batch to, so no client pays ONNX Runtime's first runs), so a new version never interrupts the one serving.
Unloading takes a version out of every lookup first, then waits for its in-flight and queued requests to finish,
then closes its scheduler: no request is lost. Loading happens off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ponder.errors import NotFoundError, PonderError
from ponder.serve.repository import ModelVersion, Repository
from ponder.serve.scheduler import BatchSettings, Scheduler

log = logging.getLogger("ponder.serve")
MODES = ("none", "explicit", "poll")
WARMUP_SEQ = 16  # tokens per row in a warm-up run (the model's context when shorter)


class ControlError(PonderError):
    """A load or unload the mode does not allow (FAILED_PRECONDITION)."""


def warmup_batch_sizes(settings: BatchSettings, config: dict[str, Any]) -> list[int]:
    """The batch sizes a version runs once before it is ready: its config.json's ``warmup.batch_sizes``, else the
    powers of two up to ``max_batch_size`` and ``max_batch_size`` itself."""
    chosen = (config.get("warmup") or {}).get("batch_sizes")
    if chosen is not None:
        if not isinstance(chosen, list) or not all(isinstance(b, int) and 1 <= b <= settings.max_batch_size
                                                   for b in chosen):
            raise ValueError(f"config.json: warmup.batch_sizes must be a list of whole numbers in [1, "
                             f"{settings.max_batch_size}], got {chosen!r}")
        return sorted(set(chosen))
    sizes, b = [], 1
    while b < settings.max_batch_size:
        sizes.append(b)
        b *= 2
    return [*sizes, settings.max_batch_size]


def warm_up(engine: Any, sizes: list[int]) -> float:
    """Run ``engine`` once at each batch size (and one generation step when it can generate); the seconds taken."""
    start = time.perf_counter()
    seq = min(WARMUP_SEQ, engine.max_seq_len)
    for b in sizes:
        engine.infer(np.zeros((b, seq), dtype=np.int64))
    if engine.can_generate:
        rows = [([0] * seq, None, engine.default_threshold)] * min(2, max(sizes))
        steps = engine.decode_rows(rows)
        engine.decode_rows([([0], step.past, engine.default_threshold) for step in steps])
    return time.perf_counter() - start


class ModelControl:
    def __init__(self, repo: Repository, defaults: BatchSettings, workers: int, mode: str,
                 on_execution: Callable[[ModelVersion], Callable[[int], None]]) -> None:
        if mode not in MODES:
            raise PonderError(f"--model-control-mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.repo, self.defaults, self.workers, self.mode = repo, defaults, workers, mode
        self.on_execution = on_execution
        self.retiring: list[ModelVersion] = []  # out of every lookup, finishing their work
        self._lock = asyncio.Lock()  # one load, unload or poll at a time

    # -- serving a version ---------------------------------------------------------------------------------------
    def prepare(self, mv: ModelVersion) -> None:
        """Make ``mv`` servable (its scheduler, warmed up) or mark it unavailable with why. Blocking: runs off the
        event loop for loads while serving."""
        if not mv.ready:
            return
        assert mv.engine is not None
        try:
            settings = self.defaults.for_model(mv.engine.config)
            sizes = warmup_batch_sizes(settings, mv.engine.config)
            seconds = warm_up(mv.engine, sizes)
        except Exception as exc:  # noqa: BLE001  (a bad setting or a failed run: this version only)
            mv.error, mv.engine = str(exc) if isinstance(exc, (ValueError, PonderError)) else \
                f"warm-up failed: {type(exc).__name__}: {exc}", None
            log.error("model %s version %s is unavailable: %s", mv.name, mv.version, mv.error)
            return
        mv.settings = settings
        log.info("model %s version %s warmed up in %.0f ms (batch sizes %s)", mv.name, mv.version, seconds * 1e3,
                 ", ".join(map(str, sizes)))

    def serve(self, mv: ModelVersion) -> None:
        """Give a prepared version its scheduler (on the event loop)."""
        if not mv.ready:
            return
        mv.executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=f"ponder-{mv.name}")
        mv.scheduler = Scheduler(mv.engine, mv.settings, mv.executor, self.workers, self.on_execution(mv))

    async def start(self, names: list[str] | None = None) -> None:
        """Serve what the mode serves at start: every model (``none``, ``poll``) or ``names`` (``explicit``)."""
        if self.mode == "explicit":
            for name in names or []:
                await self.load(name, allowed=True)
            return
        loop = asyncio.get_running_loop()
        for mv in self.repo.all_versions():
            await loop.run_in_executor(None, self.prepare, mv)
            self.serve(mv)

    # -- load, unload, poll --------------------------------------------------------------------------------------
    async def load(self, name: str, allowed: bool = False) -> None:
        """Load (or load again) every version of model ``name`` from the repository. The versions it serves keep
        serving until the new ones are ready; then the new ones replace them."""
        if self.mode != "explicit" and not allowed:
            raise ControlError(f"loading a model needs --model-control-mode explicit (this server runs {self.mode})")
        if name not in self.repo.model_names():
            raise NotFoundError(f"model {name!r} is not in the repository {str(self.repo.root)!r}")
        async with self._lock:
            loop = asyncio.get_running_loop()
            versions = await loop.run_in_executor(None, self.repo.read_model, name)
            if not versions:
                raise NotFoundError(f"model {name!r} has no VERSION/model.onnx in the repository")
            for mv in versions.values():
                await loop.run_in_executor(None, self.prepare, mv)
            for mv in versions.values():
                self.serve(mv)
            replaced = self.repo.remove(name)
            self.repo.install(name, versions)
            await self._retire(replaced)
            log.info("loaded model %s (versions %s)", name, ", ".join(versions))

    async def unload(self, name: str) -> None:
        """Stop serving model ``name``: no new request finds it; those in flight finish first."""
        if self.mode != "explicit":
            raise ControlError(f"unloading a model needs --model-control-mode explicit (this server runs {self.mode})")
        async with self._lock:
            if name not in self.repo.models:
                raise NotFoundError(f"model {name!r} is not loaded")
            await self._retire(self.repo.remove(name))
            log.info("unloaded model %s", name)

    async def _retire(self, versions: list[ModelVersion]) -> None:
        """Close the schedulers of ``versions`` (already out of every lookup) once their work is done."""
        self.retiring += versions
        for mv in versions:
            if mv.scheduler is not None:
                while mv.scheduler.busy:
                    await asyncio.sleep(0.01)
                mv.scheduler.close(NotFoundError(f"model {mv.name!r} version {mv.version} was unloaded"))
                mv.executor.shutdown(wait=False)
            mv.scheduler = mv.executor = None
            self.retiring.remove(mv)

    async def poll(self, seconds: float) -> None:
        """Every ``seconds``: load new versions (and new models), retire the versions whose folder is gone."""
        while True:
            await asyncio.sleep(seconds)
            try:
                await self.poll_once()
            except Exception:  # never let one bad poll stop polling
                log.exception("polling the repository failed")

    async def poll_once(self) -> None:
        loop = asyncio.get_running_loop()
        async with self._lock:
            names = set(await loop.run_in_executor(None, self.repo.model_names))
            for name in sorted(names | set(self.repo.models)):
                held = set(self.repo.models.get(name, {}))
                present = await loop.run_in_executor(None, self.repo.folder_versions, name) if name in names \
                    else set()
                if present - held:
                    versions = await loop.run_in_executor(None, self.repo.read_model, name, held)
                    for mv in versions.values():
                        await loop.run_in_executor(None, self.prepare, mv)
                        self.serve(mv)
                    self.repo.install(name, versions)
                    log.info("poll: model %s now serves versions %s", name, ", ".join(self.repo.models[name]))
                if held - present:
                    await self._retire(self.repo.remove(name, held - present))
                    log.info("poll: model %s no longer serves versions %s", name, ", ".join(sorted(held - present)))
