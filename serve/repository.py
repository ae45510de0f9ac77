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
from typing import Any

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
    settings: Any = None  # its BatchSettings, once prepared to serve (ponder.serve.control)
    scheduler: Any = None  # its Scheduler while it serves
    executor: Any = None  # the threads its runs compute on

    @property
    def ready(self) -> bool:
        return self.engine is not None


def check_root(root: str | Path) -> Path:
    """``root`` as a Path, or a PonderError when it is not a folder."""
    if not Path(root).is_dir():
        raise PonderError(f"--repository {str(root)!r} is not a folder (expected ROOT/NAME/VERSION/model.onnx)")
    return Path(root)


class Repository:
    """The models served from ``root``. ``load=False`` starts empty (explicit model control: models are read
    when a client loads them, :meth:`read_model`, and installed with :meth:`install`)."""

    def __init__(self, root: str | Path, threads: int | None = None, load: bool = True) -> None:
        self.root = check_root(root)
        self.threads = threads
        self.models: dict[str, dict[str, ModelVersion]] = {}
        if load:
            for name in self.model_names():
                versions = self.read_model(name)
                if versions:
                    self.models[name] = versions

    def model_names(self, quiet: bool = False) -> list[str]:
        """The names of the model folders under the root that can be served (each problem logged unless
        ``quiet``, and skipped)."""
        names = []
        for folder, problem in model_folders(self.root):
            if problem is not None:
                if not quiet:
                    log.warning("skipping %r: %s", str(folder), problem)
            else:
                names.append(folder.name)
        return names

    def read_model(self, name: str, skip: set[str] = frozenset()) -> dict[str, ModelVersion]:
        """Every version of model ``name`` read from its folder and loaded (those in ``skip`` left out), a failed
        one kept with its reason; {} when the folder holds none or cannot be read (logged): one model's
        unreadable entry never stops the others, nor the server."""
        folder = self.root / name
        try:
            return self._read_model(folder, skip)
        except Exception as exc:  # noqa: BLE001  (an unreadable entry; a model's load failure is caught lower)
            log.error("skipping %r: %s: %s", str(folder), type(exc).__name__, exc)
            return {}

    def folder_versions(self, name: str) -> set[str]:
        """The version numbers in model ``name``'s folder now (for polling)."""
        try:
            return {str(number) for number, _ in version_folders(self.root / name)}
        except Exception:  # noqa: BLE001  (gone or unreadable: no versions)
            return set()

    def _read_model(self, folder: Path, skip: set[str]) -> dict[str, ModelVersion]:
        for entry, why in skipped_entries(folder):
            log.warning("skipping %r: %s", str(entry), why)
        versions = {}
        for number, vdir in version_folders(folder):
            if str(number) in skip:
                continue
            version = ModelVersion(folder.name, str(number), vdir / MODEL_FILE)
            problem = outside_problem(version.path, self.root)
            if problem is not None:
                version.error = f"its model file cannot be used: {problem}"
                log.error("model %s version %s is unavailable: %s", version.name, version.version, version.error)
            else:
                self._load(version)
            versions[version.version] = version
        if not versions and not skip:
            log.warning("skipping %r: no VERSION/%s inside", str(folder), MODEL_FILE)
        return versions

    def install(self, name: str, versions: dict[str, ModelVersion]) -> None:
        """Serve ``versions`` of model ``name`` beside those it has (a version number already there is replaced)."""
        merged = {**self.models.get(name, {}), **versions}
        self.models[name] = dict(sorted(merged.items(), key=lambda kv: int(kv[0])))

    def remove(self, name: str, versions: set[str] | None = None) -> list[ModelVersion]:
        """Stop serving model ``name`` (or just ``versions`` of it); returns what was removed."""
        held = self.models.get(name, {})
        gone = [v for k, v in held.items() if versions is None or k in versions]
        kept = {k: v for k, v in held.items() if versions is not None and k not in versions}
        if kept:
            self.models[name] = kept
        else:
            self.models.pop(name, None)
        return gone

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
