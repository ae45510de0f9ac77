"""A model repository laid out like Triton's: ``ROOT/NAME/VERSION/model.onnx``, every version loaded at start.

Requests name models by key; nothing a request says becomes a path, so a name cannot reach outside ROOT. At scan
time, a folder whose name breaks the model name rule, or a folder (or link) that resolves outside ROOT, is skipped
with a log line (the rules are ``ponder.model_repository``'s, which ``ponder export`` writes by), as is any entry that
cannot be read (a link to nothing, a file where a folder belongs, a version folder not named in ASCII digits); a
model that fails to load (its model file a link loop, its config.json a link out of ROOT, a graph without the
inputs and outputs the engine uses) is kept as UNAVAILABLE with its reason while the others serve. Startup never
dies of one model.

Errors here are the domain's (NotFoundError, UnavailableError); the server maps them to gRPC status codes.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ponder.errors import NotFoundError, PonderError, UnavailableError, echo
from ponder.model_repository import (
    MODEL_FILE,
    model_folders,
    outside_problem,
    parse_version,
    skipped_entries,
    version_folders,
)
from ponder.serve.engine import Engine

log = logging.getLogger("ponder.serve")


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * 1e9)


@dataclass
class Stats:
    """Counters behind ModelStatistics (Triton's meaning: inference_count counts batch items)."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, *, ok: bool, total_s: float, queue_s: float = 0.0, compute_s: float = 0.0,
               input_s: float = 0.0, output_s: float = 0.0, batch: int = 0) -> None:
        """One request. ``input_s``: decoding and checking its inputs; ``compute_s``: the model runs it took part
        in; ``output_s``: building the response(s); ``batch``: its rows. As Triton's, the queue and compute
        durations count requests (perf_analyzer refuses statistics where their counts differ), inference_count
        counts rows and execution_count model runs (:meth:`execution`), which batching makes fewer."""
        with self.lock:
            (self.success if ok else self.fail).add(total_s)
            if ok:
                for duration, seconds in ((self.queue, queue_s), (self.compute_input, input_s),
                                          (self.compute_infer, compute_s), (self.compute_output, output_s)):
                    duration.add(seconds)
                self.inference_count += batch
                self.last_inference_ms = int(time.time() * 1e3)

    def execution(self) -> None:
        """One model run (which may have served several requests)."""
        with self.lock:
            self.execution_count += 1


@dataclass
class ModelVersion:
    name: str
    version: str
    path: Path
    engine: Engine | None = None
    error: str | None = None
    stats: Stats = field(default_factory=Stats)

    @property
    def ready(self) -> bool:
        return self.engine is not None


def check_root(root: str | Path) -> Path:
    """``root`` as a Path, or a PonderError when it is not a folder."""
    if not Path(root).is_dir():
        raise PonderError(f"--repository {str(root)!r} is not a folder (expected ROOT/NAME/VERSION/model.onnx)")
    return Path(root)


class Repository:
    def __init__(self, root: str | Path, threads: int | None = None) -> None:
        self.root = check_root(root)
        self.threads = threads
        self.models: dict[str, dict[str, ModelVersion]] = {}
        self._scan()

    def _scan(self) -> None:
        for folder, problem in model_folders(self.root):
            if problem is not None:
                log.warning("skipping %r: %s", str(folder), problem)
                continue
            try:  # one model's unreadable entry never stops the others (nor the server) from starting
                self._scan_model(folder)
            except Exception as exc:  # noqa: BLE001  (an unreadable entry; a model's load failure is caught lower)
                log.error("skipping %r: %s: %s", str(folder), type(exc).__name__, exc)

    def _scan_model(self, folder: Path) -> None:
        for entry, why in skipped_entries(folder):
            log.warning("skipping %r: %s", str(entry), why)
        versions = {}
        for number, vdir in version_folders(folder):
            version = ModelVersion(folder.name, str(number), vdir / MODEL_FILE)
            problem = outside_problem(version.path, self.root)
            if problem is not None:
                version.error = f"its model file cannot be used: {problem}"
                log.error("model %s version %s is unavailable: %s", version.name, version.version, version.error)
            else:
                self._load(version)
            versions[version.version] = version
        if versions:
            self.models[folder.name] = versions
        else:
            log.warning("skipping %r: no VERSION/%s inside", str(folder), MODEL_FILE)

    def _load(self, version: ModelVersion) -> None:
        try:
            # spinning=False: CPU for the RPC threads; root: no config or decode graph linked from outside it
            version.engine = Engine(version.path, threads=self.threads, spinning=False, root=self.root)
        except Exception as exc:  # any failure stays with this model; the others serve
            version.error = str(exc) if isinstance(exc, PonderError) else f"{type(exc).__name__}: {exc}"
            log.error("model %s version %s failed to load: %s", version.name, version.version, version.error)
        else:
            log.info("loaded model %s version %s (%s)", version.name, version.version, version.path)

    def all_versions(self) -> list[ModelVersion]:
        return [v for versions in self.models.values() for v in versions.values()]

    def versions(self, name: str, version: str = "") -> list[ModelVersion]:
        """Every version of model ``name`` (or just ``version``), ready or not; a NotFoundError when there is none."""
        versions = self.models.get(name)
        if versions is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise NotFoundError(f"model_name {echo(name)} is not in the repository (models: {known})")
        if not version:
            return list(versions.values())
        number = parse_version(version)  # "007" asks for version 7
        found = versions.get(str(number)) if number is not None else None
        if found is None:
            raise NotFoundError(f"model_version {echo(version)} of model {name!r} does not exist "
                                f"(versions: {', '.join(versions)})")
        return [found]

    def find(self, name: str, version: str = "") -> ModelVersion:
        """The model version a request names (newest ready one when ``version`` is empty).

        A NotFoundError for an unknown name or version, an UnavailableError for one that failed to load."""
        candidates = self.versions(name, version)
        ready = [v for v in candidates if v.ready]
        found = ready[-1] if ready else candidates[-1]
        if not found.ready:
            raise UnavailableError(f"model {name!r} version {found.version} is not ready: it failed to load "
                                   f"({found.error})")
        return found
