"""What the registry knows about each plugin: kinds, names, parameters and their checks."""

from __future__ import annotations

import importlib
import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import PluginParameterError, UnknownKindError


@dataclass(frozen=True)
class KindSpec:
    """One kind of plugin: its hook and the leading factory arguments ponder supplies itself."""

    name: str
    hook: str
    inputs: int  # leading positional arguments supplied by ponder (feature size, params, ...)
    context: tuple[str, ...] = ()  # keyword arguments supplied by ponder (a norm's position and input std)
    summary: str = ""


KINDS: dict[str, KindSpec] = {
    k.name: k
    for k in (
        KindSpec("norm", "register_norms", 1, ("position", "input_std"), "normalisation layers"),
        KindSpec("optimizer", "register_optimizers", 1, (), "optimizers"),
        KindSpec("controller", "register_controllers", 0, (), "training-time controllers that turn dials"),
        KindSpec("halting", "register_halting", 2, (), "halting rules for adaptive depth"),
    )
}
NORM_POSITIONS = ("attn", "ffn", "final", "conv")
_KIND_ALIASES = {"norms": "norm", "optimizers": "optimizer", "optim": "optimizer",
                 "controllers": "controller", "control": "controller", "halt": "halting"}


def normalize_name(name: str) -> str:
    """One key for every spelling: ``DyT``, ``dyt``, ``dy_t`` and ``dy-t`` are all ``dyt``."""
    return re.sub(r"[\s_\-.]+", "", str(name)).lower()


def normalize_kind(kind: str) -> str:
    """Return the canonical kind name, or raise naming the valid kinds."""
    key = str(kind).strip().lower()
    key = _KIND_ALIASES.get(key, key)
    if key not in KINDS:
        raise UnknownKindError(f"unknown plugin kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    return key


REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class Param:
    """One factory parameter as ``describe`` shows it."""

    name: str
    default: Any = REQUIRED
    annotation: str = ""
    doc: str = ""
    supplied_by_ponder: bool = False

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "required": self.required, "type": self.annotation,
                               "doc": self.doc, "supplied_by_ponder": self.supplied_by_ponder}
        if not self.required:
            out["default"] = _jsonable(self.default)
        return out


@dataclass(frozen=True)
class PluginInfo:
    """One registered plugin (timm's shape): what it is, who provides it, how to build it."""

    kind: str
    name: str  # as registered; ``key`` is the normalised form
    factory: Callable[..., Any] | str  # a callable or a lazy "module:attribute" path
    description: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    plugin: str = ""  # the plugin module that registered it (what ``-p no:NAME`` blocks)
    distribution: str = ""
    version: str = ""

    @property
    def key(self) -> str:
        return normalize_name(self.name)

    def load(self) -> Callable[..., Any]:
        """The factory itself, importing it if it was registered by path."""
        if callable(self.factory):
            return self.factory
        module, _, attr = self.factory.partition(":")
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "description": self.description,
                "plugin": self.plugin, "distribution": self.distribution, "version": self.version}


def describe_factory(info: PluginInfo) -> tuple[list[Param], str]:
    """The factory's parameters (with registered defaults applied) and its docstring."""
    factory = info.load()
    spec = KINDS[info.kind]
    doc = inspect.getdoc(factory) or ""
    arg_docs = _argument_docs(doc)
    params: list[Param] = []
    positional = 0
    for p in _signature(factory).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        supplied = p.name in spec.context
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and positional < spec.inputs:
            positional += 1
            supplied = True
        default = info.defaults.get(p.name, p.default)
        params.append(Param(p.name, default, _annotation_text(p.annotation), arg_docs.get(p.name, ""), supplied))
    return params, doc


def check_params(info: PluginInfo, params: Mapping[str, Any]) -> dict[str, Any]:
    """Check settings against the factory's signature; return them merged over the defaults.

    Raises :class:`PluginParameterError` naming an unknown or ill-typed parameter and
    listing the valid ones.
    """
    factory = info.load()
    sig = _signature(factory)
    described, _ = describe_factory(info)
    settings = {p.name: p for p in described if not p.supplied_by_ponder}
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    label = f"{info.kind} {info.name!r}"
    valid = ", ".join(settings) or "(none)"
    for name, value in params.items():
        if name not in settings:
            if takes_kwargs and name not in {p.name for p in described}:
                continue
            raise PluginParameterError(f"{label} has no parameter {name!r}; valid parameters: {valid}")
        param = sig.parameters[name]
        problem = _type_problem(value, param.annotation, settings[name].default)
        if problem:
            raise PluginParameterError(
                f"{label}: parameter {name!r} got {value!r} ({type(value).__name__}), expected {problem}; "
                f"valid parameters: {valid}"
            )
    merged = {k: v for k, v in info.defaults.items()}
    merged.update(params)
    missing = [n for n, p in settings.items() if p.required and n not in merged]
    if missing:
        raise PluginParameterError(f"{label} needs parameter(s) {', '.join(map(repr, missing))}")
    return merged


# -- helpers -------------------------------------------------------------------------------------

def _signature(factory: Callable[..., Any]) -> inspect.Signature:
    try:
        return inspect.signature(factory, eval_str=True)
    except Exception:  # unresolvable string annotations: fall back to the raw ones
        return inspect.signature(factory)


def _annotation_text(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


_SCALARS = (bool, int, float, str)


def _accepts(value: Any, cls: type) -> bool:
    if cls is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if cls is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if cls in (tuple, list):
        return isinstance(value, (tuple, list))
    return isinstance(value, cls)


def _type_problem(value: Any, annotation: Any, default: Any) -> str | None:
    """A description of the expected type when ``value`` does not fit, else None."""
    allowed = _annotation_types(annotation)
    if allowed is None and default is not REQUIRED and default is not None:
        allowed = [type(default)] if isinstance(default, (*_SCALARS, tuple, list)) else None
    if not allowed:
        return None
    if value is None and (default is None or type(None) in allowed):
        return None
    if any(_accepts(value, cls) for cls in allowed):
        if isinstance(value, (tuple, list)) and isinstance(default, (tuple, list)) and len(value) != len(default):
            return f"a sequence of {len(default)} values"
        return None
    return " or ".join(cls.__name__ for cls in allowed if cls is not type(None))


def _annotation_types(annotation: Any) -> list[type] | None:
    """Plain classes an annotation admits, or None when it cannot be checked simply."""
    if annotation is inspect.Parameter.empty or isinstance(annotation, str):
        return None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        out: list[type] = []
        for arg in typing.get_args(annotation):
            sub = _annotation_types(arg)
            if sub is None:
                return None
            out.extend(sub)
        return out
    if origin in (tuple, list):
        return [tuple, list]
    if annotation is type(None):
        return [type(None)]
    if isinstance(annotation, type) and annotation in (*_SCALARS, tuple, list, dict):
        return [annotation]
    if isinstance(annotation, type) and annotation.__module__ == "torch":  # e.g. Tensor: any value may be one
        return None
    return None


_ARG_LINE = re.compile(r"^(\s*)\**(\w+)\**\s*(\([^)]*\))?\s*:\s*(.*)$")


def _argument_docs(doc: str) -> dict[str, str]:
    """First-sentence docs of arguments in an ``Args:`` section (Google / torch style)."""
    out: dict[str, str] = {}
    in_args = False
    indent: int | None = None
    current: str | None = None
    for line in doc.splitlines():
        stripped = line.strip()
        if re.match(r"^(Args|Arguments|Parameters)\s*:?\s*$", stripped):
            in_args, indent, current = True, None, None
            continue
        if not in_args:
            continue
        if stripped == "":
            current = None
            continue
        match = _ARG_LINE.match(line)
        level = len(line) - len(line.lstrip())
        if match and (indent is None or level == indent):
            indent = level
            current = match.group(2)
            out[current] = match.group(4).strip()
        elif current and indent is not None and level > indent:
            out[current] = (out[current] + " " + stripped).strip()
        elif indent is not None and level < indent:
            in_args = False
    return out


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)
