"""Run configs: TOML files (or built-in presets) checked completely before anything is built.

```toml
[model]              # ModelConfig fields
n_layers = 6
[norm]               # a norm plugin and its settings; [norm.positions.final] overrides one position
name = "rmsnorm"
[halting]            # a halting plugin: act, pondernet, fixed
name = "act"
act_lambda = 0.01
[optimizer]
name = "adamw"
lr = 3e-3
[[controllers]]      # run in this order
name = "..."
[data]               # DataConfig fields
[train]              # TrainConfig fields
```
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from ponder.errors import ConfigError
from ponder.limits import MODEL_NORM_POSITIONS, check_threshold

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SECTIONS = ("model", "norm", "halting", "optimizer", "controllers", "data", "train")  # the top-level keys


def _check_misplaced(section: str, keys: Any) -> None:
    """A top-level key written after a ``[section]`` header lands in that section: say so, and where it goes."""
    misplaced = [k for k in SECTIONS if k in keys]
    if misplaced:
        key = misplaced[0]
        how = "[[controllers]] tables" if key == "controllers" else f"a [{key}] table"
        raise ConfigError(f"[{section}] has {key!r}, a top-level key that must go before any section: TOML puts "
                          f"every key written after the [{section}] header into [{section}]. Move `{key} = ...` "
                          f"above the first [section] header (or write {how})")


@dataclass
class ModelConfig:
    """The ACT language model's shape and its initial dial values."""

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 6
    n_heads: int = 4
    n_local_heads: int = 2  # heads that attend within the sliding window; the others see the whole prefix
    d_ff: int = 512
    max_seq_len: int = 256
    rope_base: float = 10000.0  # dial
    attn_window: float = 40.0  # dial, rounded where it is used
    act_threshold: float = 0.99  # dial, in (0, 1]; 1.0 runs every layer

    def check(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"model.d_model ({self.d_model}) must split into n_heads ({self.n_heads}) "
                              "heads of even size (for RoPE)")
        if not 0 <= self.n_local_heads <= self.n_heads:
            raise ConfigError(f"model.n_local_heads must be in [0, n_heads={self.n_heads}], got {self.n_local_heads}")
        check_threshold(self.act_threshold, "model.act_threshold")
        if not 1 <= self.attn_window <= self.max_seq_len:
            raise ConfigError(f"model.attn_window = {self.attn_window} is outside [1, max_seq_len={self.max_seq_len}]")
        if not 10 <= self.rope_base <= 1e8:
            raise ConfigError(f"model.rope_base = {self.rope_base} is outside [10, 1e8]")


@dataclass
class PluginSpec:
    """A plugin by name with its settings; norms may override settings per position."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    positions: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def parse(cls, section: str, raw: Any) -> PluginSpec:
        if isinstance(raw, str):
            return cls(raw)
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise ConfigError(f"[{section}] needs a plugin name, e.g. name = \"...\"; got {raw!r}")
        if "controllers" in raw:
            _check_misplaced(section, ["controllers"])
        params = {k: v for k, v in raw.items() if k not in ("name", "positions")}
        positions = raw.get("positions", {})
        if section != "norm" and positions:
            raise ConfigError(f"[{section}] has no per-position settings (only [norm.positions.*] does)")
        bad = set(positions) - set(MODEL_NORM_POSITIONS)
        if bad:
            raise ConfigError(f"[norm.positions] has unknown position(s) {sorted(bad)}; valid: "
                              f"{', '.join(MODEL_NORM_POSITIONS)}")
        return cls(raw["name"], params, {k: dict(v) for k, v in positions.items()})

    def params_for(self, position: str) -> dict[str, Any]:
        return {**self.params, **self.positions.get(position, {})}

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, **self.params}
        if self.positions:
            out["positions"] = self.positions
        return out


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes tokens."""

    source: str = "embedded"  # embedded (Python's own docs), wikitext2 (a local folder), or text (a file)
    path: str = ""
    tokenizer: str = "byte"  # byte, or word (a vocabulary built from the training split)
    max_vocab: int = 0  # word tokenizer: keep this many most frequent words (0: all)

    def check(self) -> None:
        if self.source not in ("embedded", "wikitext2", "text"):
            raise ConfigError(f"data.source = {self.source!r}; valid: embedded, wikitext2, text")
        if self.source != "embedded" and not self.path:
            raise ConfigError(f"data.source = {self.source!r} needs data.path")
        if self.tokenizer not in ("byte", "word"):
            raise ConfigError(f"data.tokenizer = {self.tokenizer!r}; valid: byte, word")


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 128
    warmup_steps: int = 50
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_batches: int = 20
    log_every: int = 10
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"  # auto (cuda when available), cpu, cuda, cuda:N

    def check(self, model: ModelConfig) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "log_every",
                     "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len > model.max_seq_len:
            raise ConfigError(f"train.seq_len ({self.seq_len}) exceeds model.max_seq_len ({model.max_seq_len})")
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError("train.warmup_steps and train.grad_clip must be >= 0")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"train.device = {self.device!r}; valid: auto, cpu, cuda, cuda:N")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    norm: PluginSpec = field(default_factory=lambda: PluginSpec("layernorm"))
    halting: PluginSpec = field(default_factory=lambda: PluginSpec("act"))
    optimizer: PluginSpec = field(default_factory=lambda: PluginSpec("adamw", {"lr": 3e-3}))
    controllers: list[PluginSpec] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": dataclasses.asdict(self.model),
            "norm": self.norm.to_json(),
            "halting": self.halting.to_json(),
            "optimizer": self.optimizer.to_json(),
            "controllers": [c.to_json() for c in self.controllers],
            "data": dataclasses.asdict(self.data),
            "train": dataclasses.asdict(self.train),
        }


def _dataclass_from(cls: type, section: str, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{section}] must be a table, got {raw!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        _check_misplaced(section, unknown)
        raise ConfigError(f"[{section}] has unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(known)}")
    defaults = cls()
    for key, value in raw.items():
        want = type(getattr(defaults, key))
        ok = isinstance(value, want) or (want is float and isinstance(value, int))
        if isinstance(value, bool) and want is not bool:
            ok = False
        if not ok:
            raise ConfigError(f"{section}.{key} = {value!r} should be {want.__name__}")
    return cls(**{k: (float(v) if isinstance(getattr(defaults, k), float) else v) for k, v in raw.items()})


def parse_config(raw: dict[str, Any]) -> RunConfig:
    """Build and check a :class:`RunConfig` from a parsed TOML/JSON mapping (plugins included)."""
    sections = set(SECTIONS)
    unknown = sorted(set(raw) - sections)
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}; valid sections: {', '.join(sorted(sections))}")
    run = RunConfig()
    if "model" in raw:
        run.model = _dataclass_from(ModelConfig, "model", raw["model"])
    if "data" in raw:
        run.data = _dataclass_from(DataConfig, "data", raw["data"])
    if "train" in raw:
        run.train = _dataclass_from(TrainConfig, "train", raw["train"])
    for section in ("norm", "halting", "optimizer"):
        if section in raw:
            setattr(run, section, PluginSpec.parse(section, raw[section]))
    controllers = raw.get("controllers", [])
    if not isinstance(controllers, list):
        raise ConfigError("controllers must be an array of tables: [[controllers]] name = \"...\"")
    run.controllers = [PluginSpec.parse("controllers", c) for c in controllers]
    check_config(run)
    return run


def check_config(run: RunConfig) -> None:
    """Check every value and every plugin (name and parameters) before anything is built."""
    from ponder import registry

    run.model.check()
    run.data.check()
    run.train.check(run.model)
    try:
        for position in MODEL_NORM_POSITIONS:
            registry.validate("norm", run.norm.name, run.norm.params_for(position))
        registry.validate("halting", run.halting.name, run.halting.params)
        registry.validate("optimizer", run.optimizer.name, run.optimizer.params)
        for spec in run.controllers:
            registry.validate("controller", spec.name, spec.params)
    except registry.PluginError as exc:
        raise ConfigError(str(exc)) from exc


def presets() -> list[str]:
    """Names of the built-in configs (``ponder train --preset NAME``)."""
    return sorted(p.name[:-5] for p in resources.files("ponder.presets").iterdir() if p.name.endswith(".toml"))


def load_config(path: str | Path | None = None, *, preset: str | None = None) -> RunConfig:
    """Read a TOML run config from ``path``, or a built-in preset by name."""
    if preset is not None:
        if preset not in presets():
            raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(presets())}")
        text = resources.files("ponder.presets").joinpath(f"{preset}.toml").read_text()
        where = f"preset {preset!r}"
    else:
        if path is None:
            raise ConfigError("give a config file (--config run.toml) or a preset (--preset demo)")
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        text, where = p.read_text(), str(p)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where} is not valid TOML: {exc}") from None
    return parse_config(raw)
