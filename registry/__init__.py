"""The ponder plugin registry: hookspecs, loading, and the catalogue (list / describe / create).

The module-level functions use one shared :class:`Registry`, built on first use from the
environment (``PONDER_DISABLE_PLUGIN_AUTOLOAD``, ``PONDER_PLUGINS``) and :func:`configure`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .catalogue import KINDS, NORM_POSITIONS, Param, PluginInfo, normalize_kind, normalize_name
from .errors import (
    PluginConflictError,
    PluginError,
    PluginLoadError,
    PluginLoadWarning,
    PluginParameterError,
    UnknownKindError,
    UnknownPluginError,
)
from .hookspecs import hookimpl, hookspec
from .manager import BUILTIN_PLUGINS, ENTRY_POINT_GROUP, Description, PluginFailure, Registry

__all__ = [
    "BUILTIN_PLUGINS", "ENTRY_POINT_GROUP", "KINDS", "NORM_POSITIONS", "Description", "Param", "PluginConflictError",
    "PluginError", "PluginFailure", "PluginInfo", "PluginLoadError", "PluginLoadWarning", "PluginParameterError",
    "Registry", "UnknownKindError", "UnknownPluginError", "configure", "create", "describe", "get_registry",
    "hookimpl", "hookspec", "list_plugins", "normalize_kind", "normalize_name", "register_plugin", "validate",
]

_registry: Registry | None = None
_blocked: list[str] = []
_load: list[str] = []


def configure(*, block: Iterable[str] = (), load: Iterable[str] = ()) -> None:
    """Set the switches for the shared registry (``-p no:NAME`` / ``-p NAME``) and reload it lazily."""
    global _registry
    _blocked[:] = list(block)
    _load[:] = list(load)
    _registry = None


def get_registry() -> Registry:
    """The shared registry, loading plugins on first call."""
    global _registry
    if _registry is None:
        _registry = Registry.from_environment(blocked=_blocked, load=_load)
    return _registry


def list_plugins(kind: str | None = None, pattern: str | None = None) -> list[PluginInfo]:
    """Registered plugins, optionally of one kind and matching a glob ``pattern``."""
    return get_registry().list_plugins(kind, pattern)


def describe(kind: str, name: str) -> Description:
    """A plugin's parameters, defaults and docs, from its factory's signature."""
    return get_registry().describe(kind, name)


def validate(kind: str, name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check a plugin's parameters without building it; returns them merged over its defaults."""
    return get_registry().validate(kind, name, params)


def register_plugin(plugin: Any, name: str, **kwargs: Any) -> None:
    """Load a plugin object from this process into the shared registry (see :meth:`Registry.register_plugin`)."""
    get_registry().register_plugin(plugin, name, **kwargs)


def create(kind: str, name: str, *inputs: Any, **params: Any) -> Any:
    """Build a plugin: e.g. ``create("norm", "rmsnorm", 64, position="ffn", eps=1e-6)``."""
    return get_registry().create(kind, name, *inputs, **params)
