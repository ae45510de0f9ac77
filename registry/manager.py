"""Finding and loading plugins: built-ins and entry points by one path, with the user's switches.

Built-in plugins are loaded by name exactly as third-party ones are (pytest's
``default_plugins``), so ``-p no:NAME`` blocks either. Loading happens once, on first use.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from .catalogue import (
    KINDS,
    NORM_POSITIONS,
    Param,
    PluginInfo,
    check_params,
    describe_factory,
    normalize_kind,
    normalize_name,
)
from .errors import (
    PluginConflictError,
    PluginLoadError,
    PluginLoadWarning,
    PluginParameterError,
    UnknownPluginError,
)

ENTRY_POINT_GROUP = "ponder"
ENV_DISABLE_AUTOLOAD = "PONDER_DISABLE_PLUGIN_AUTOLOAD"
ENV_ALLOW = "PONDER_PLUGINS"

_LOADING = threading.RLock()  # loading registers into self._pm step by step: one thread at a time

# Built-in plugin modules, loaded by name like any other plugin (and blockable the same way).
BUILTIN_PLUGINS: dict[str, str] = {
    "ponder.norm": "ponder.plugins.norm",
    "ponder.optim": "ponder.plugins.optim",
    "ponder.control": "ponder.plugins.control",
    "ponder.halt": "ponder.plugins.halt",
}


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded, and why."""

    plugin: str
    distribution: str
    version: str
    cause: BaseException

    @property
    def message(self) -> str:
        return (f"plugin {self.plugin!r} from {self.distribution} {self.version} failed to load: "
                f"{type(self.cause).__name__}: {self.cause}")


@dataclass(frozen=True)
class Description:
    """What ``describe`` returns: the plugin, its parameters and its documentation."""

    info: PluginInfo
    params: list[Param]
    doc: str

    def to_json(self) -> dict[str, Any]:
        return {**self.info.to_json(), "params": [p.to_json() for p in self.params], "doc": self.doc}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _env_list(name: str) -> list[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return [part.strip() for part in raw.split(",") if part.strip()]


def _ponder_version() -> str:
    """The installed ponder's version, read from its distribution's metadata (the registry sits below the core and
    imports nothing from it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ponder")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0"


class Registry:
    """The plugin catalogue: loads plugins once, then lists, describes and creates them.

    ``blocked``: plugin names never loaded (``-p no:NAME``). ``allow``: if given, the only
    third-party plugins loaded (entry-point or distribution names; ``PONDER_PLUGINS``).
    ``autoload``: load third-party plugins found through entry points
    (``PONDER_DISABLE_PLUGIN_AUTOLOAD=1`` turns it off; ``allow`` still loads the ones named).
    ``switches``: the user's ``-p NAME`` / ``-p no:NAME``; one that names no installed plugin is warned about
    (a PluginLoadWarning) when plugins are loaded.
    """

    def __init__(self, *, blocked: Iterable[str] = (), allow: Iterable[str] | None = None,
                 autoload: bool = True, switches: Iterable[str] = ()) -> None:
        self.switches = list(switches)
        self.blocked = {normalize_name(b) for b in blocked}
        self.allow = None if allow is None else {normalize_name(a) for a in allow}
        self.autoload = autoload
        self.failures: dict[str, PluginFailure] = {}
        self.skipped: list[str] = []  # plugins found but blocked or not allowed
        self._entries: dict[tuple[str, str], PluginInfo] = {}
        self._conflicts: dict[tuple[str, str], list[PluginInfo]] = {}
        self._pm: pluggy.PluginManager | None = None

    @classmethod
    def from_environment(cls, *, blocked: Iterable[str] = (), load: Iterable[str] = ()) -> Registry:
        """A registry configured by ``PONDER_*`` environment variables plus CLI switches."""
        allow = _env_list(ENV_ALLOW)
        blocked, load = list(blocked), list(load)
        if load:
            allow = (allow or []) + load
        return cls(blocked=blocked, allow=allow, autoload=not _env_flag(ENV_DISABLE_AUTOLOAD),
                   switches=[f"no:{name}" for name in blocked] + load)

    # -- loading -------------------------------------------------------------------------------

    def load(self) -> Registry:
        """Load every allowed plugin, once; later calls do nothing."""
        with _LOADING:  # two threads asking at once: the second waits for every plugin, never sees half of them
            if self._pm is None:
                self._pm = pluggy.PluginManager(hookspecs.PROJECT)
                self._pm.add_hookspecs(hookspecs)
                self._load_all()
        return self

    @property
    def plugin_manager(self) -> pluggy.PluginManager:
        """The pluggy manager, with every allowed plugin loaded."""
        self.load()
        assert self._pm is not None
        return self._pm

    def _load_all(self) -> None:
        version = _ponder_version()
        entry_points = self._entry_points()
        installed = {normalize_name(name): name for name in BUILTIN_PLUGINS}  # what a switch may name
        shown = list(BUILTIN_PLUGINS)
        for ep in entry_points:
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else None
            installed.setdefault(normalize_name(ep.name), ep.name)
            if dist_name:
                installed.setdefault(normalize_name(dist_name), dist_name)
            shown.append(f"{ep.name} (from {dist_name})" if dist_name else ep.name)
        self._check_switches(installed, shown)
        for name, module in BUILTIN_PLUGINS.items():
            if normalize_name(name) in self.blocked:
                self.skipped.append(name)
                continue
            self._load_plugin(name, lambda module=module: importlib.import_module(module), "ponder", version)
        for ep in entry_points:
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else "?"
            dist_version = dist.version if dist is not None else "?"
            names = {normalize_name(ep.name), normalize_name(dist_name)}
            if names & self.blocked:
                self.skipped.append(ep.name)
                continue
            if self.allow is not None and not names & self.allow:
                self.skipped.append(ep.name)
                continue
            if self.allow is None and not self.autoload:
                self.skipped.append(ep.name)
                continue
            self._load_plugin(ep.name, ep.load, dist_name, dist_version)

    def _check_switches(self, installed: dict[str, str], shown: list[str]) -> None:
        """Warn about each ``-p [no:]NAME`` whose NAME is no installed plugin (nor distribution): likely a typo."""
        listed = ", ".join(dict.fromkeys(shown))
        for switch in dict.fromkeys(self.switches):
            name = switch[3:] if switch.startswith("no:") else switch
            if normalize_name(name) in installed:
                continue
            close = difflib.get_close_matches(normalize_name(name), list(installed), n=1, cutoff=0.6)
            hint = f" (did you mean {installed[close[0]]!r}?)" if close else ""
            warnings.warn(f"-p {switch}: no plugin named {name!r} is installed{hint}; installed: {listed}",
                          PluginLoadWarning, stacklevel=3)

    @staticmethod
    def _entry_points() -> list[metadata.EntryPoint]:
        seen: set[tuple[str, str]] = set()
        out = []
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if (ep.name, ep.value) not in seen:  # one distribution found twice on sys.path
                seen.add((ep.name, ep.value))
                out.append(ep)
        return out

    def _load_plugin(self, name: str, loader: Callable[[], Any], dist: str, version: str) -> None:
        pm = self._pm
        assert pm is not None
        staged: list[PluginInfo] = []
        try:
            module = loader()
            pm.register(module, name=name)
            try:
                pm.check_pending()
            except Exception:
                pm.unregister(name=name)
                raise
            for spec in KINDS.values():
                for impl in getattr(pm.hook, spec.hook).get_hookimpls():
                    if impl.plugin_name == name:
                        impl.function(register=self._register_callback(spec.name, name, dist, version, staged))
        except Exception as exc:  # a broken plugin is reported, never fatal to the rest
            if pm.get_plugin(name) is not None:
                pm.unregister(name=name)
            failure = PluginFailure(name, dist, version, exc)
            self.failures[normalize_name(name)] = failure
            warnings.warn(failure.message, PluginLoadWarning, stacklevel=2)
            return
        for info in staged:
            self._add(info)

    def _register_callback(self, kind: str, plugin: str, dist: str, version: str,
                           staged: list[PluginInfo]) -> hookspecs.Register:
        def register(name: str, factory: Any, *, description: str | None = None,
                     defaults: Mapping[str, Any] | None = None) -> None:
            if not isinstance(name, str) or not normalize_name(name):
                raise ValueError(f"plugin {plugin!r} registered a {kind} with an invalid name {name!r}")
            if not (callable(factory) or (isinstance(factory, str) and ":" in factory)):
                raise TypeError(f"{kind} {name!r}: factory must be callable or 'module:attribute', "
                                f"got {factory!r}")
            if description is None:
                doc = inspect.getdoc(factory) if callable(factory) else None
                description = (doc or "").strip().splitlines()[0] if doc else ""
            staged.append(PluginInfo(kind, name, factory, description, dict(defaults or {}), plugin, dist, version))

        return register

    def _add(self, info: PluginInfo) -> None:
        key = (info.kind, info.key)
        if key in self._conflicts:
            self._conflicts[key].append(info)
        elif key in self._entries:
            first = self._entries.pop(key)
            self._conflicts[key] = [first, info]
        else:
            self._entries[key] = info
            return
        warnings.warn(self._conflict_message(key), PluginLoadWarning, stacklevel=3)

    def _conflict_message(self, key: tuple[str, str]) -> str:
        infos = self._conflicts[key]
        who = " and ".join(f"{i.distribution} {i.version} (plugin {i.plugin!r})" for i in infos)
        return (f"{key[0]} {infos[0].name!r} is registered by both {who}; block one with "
                f"-p no:PLUGIN to use the other")

    def register_plugin(self, plugin: Any, name: str, *, distribution: str = "(in-process)",
                        version: str = "") -> None:
        """Load a plugin object from this process (a module, or any object with ``@hookimpl``
        methods), as if an entry point had named it: for notebooks, scripts and tests."""
        self.load()
        if self.plugin_manager.get_plugin(name) is not None:
            raise ValueError(f"a plugin named {name!r} is already loaded")
        self._load_plugin(name, lambda: plugin, distribution, version)
        if normalize_name(name) in self.failures:
            raise PluginLoadError(self.failures[normalize_name(name)].message)

    # -- the catalogue -------------------------------------------------------------------------

    def list_plugins(self, kind: str | None = None, pattern: str | None = None) -> list[PluginInfo]:
        """Registered plugins, sorted by kind and name; ``pattern`` is a glob on the name."""
        self.load()
        want = normalize_kind(kind) if kind else None
        infos = list(self._entries.values()) + [i for group in self._conflicts.values() for i in group]
        out = [
            i for i in infos
            if (want is None or i.kind == want)
            and (pattern is None or fnmatch.fnmatch(i.key, normalize_name(pattern).replace("\\", ""))
                 or fnmatch.fnmatch(i.name.lower(), pattern.lower()))
        ]
        order = list(KINDS)
        return sorted(out, key=lambda i: (order.index(i.kind), i.key, i.distribution))

    def get(self, kind: str, name: str) -> PluginInfo:
        """The plugin of ``kind`` called ``name`` (any spelling), or an error a user can act on."""
        self.load()
        kind = normalize_kind(kind)
        key = normalize_name(name)
        if (kind, key) in self._entries:
            return self._entries[(kind, key)]
        if (kind, key) in self._conflicts:
            raise PluginConflictError(self._conflict_message((kind, key)))
        if key in self.failures:
            failure = self.failures[key]
            raise PluginLoadError(failure.message) from failure.cause
        known = sorted(i.name for (k, _), i in self._entries.items() if k == kind)
        close = difflib.get_close_matches(key, [normalize_name(k) for k in known], n=1, cutoff=0.5)
        msg = f"unknown {kind} {name!r}"
        if close:
            msg += f"; did you mean {next(k for k in known if normalize_name(k) == close[0])!r}?"
        msg += f" Known {kind} plugins: {', '.join(known) or '(none)'}"
        if self.failures:
            msg += ". Plugins that failed to load: " + "; ".join(f.message for f in self.failures.values())
        if self.skipped:
            msg += f". Plugins not loaded (blocked or not allowed): {', '.join(self.skipped)}"
        raise UnknownPluginError(msg)

    def describe(self, kind: str, name: str) -> Description:
        """Parameters (with defaults and docs, from the factory's signature) and documentation."""
        info = self.get(kind, name)
        params, doc = describe_factory(info)
        return Description(info, params, doc)

    def validate(self, kind: str, name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Check ``params`` against the plugin's signature without building anything."""
        return check_params(self.get(kind, name), dict(params or {}))

    def create(self, kind: str, name: str, *inputs: Any, **params: Any) -> Any:
        """Build the plugin: ``inputs`` are what ponder supplies (a norm's feature size, an
        optimizer's parameters), ``params`` its settings, checked first."""
        info = self.get(kind, name)
        spec = KINDS[info.kind]
        context = {k: params.pop(k) for k in spec.context if k in params}
        settings = check_params(info, params)
        if len(inputs) != spec.inputs:
            raise PluginParameterError(
                f"{info.kind} {info.name!r} is built from {spec.inputs} input(s) supplied by ponder, "
                f"got {len(inputs)}")
        if "position" in context and context["position"] not in NORM_POSITIONS:
            raise PluginParameterError(f"norm position {context['position']!r} is not one of "
                                       f"{', '.join(NORM_POSITIONS)}")
        factory = info.load()
        accepted = inspect.signature(factory).parameters
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
        context = {k: v for k, v in context.items() if k in accepted or takes_kwargs}
        try:
            return factory(*inputs, **context, **settings)
        except ValueError as exc:  # a factory's own range checks: the user's mistake, named as such
            raise PluginParameterError(f"{info.kind} {info.name!r}: {exc}") from exc
