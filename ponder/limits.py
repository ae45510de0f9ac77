"""Limits and defaults that the library, the CLI, the tuner and the server share, each written once here.

Torch-free and cheap to import, so that ``--help`` and serving read the real values instead of copies.
"""

from __future__ import annotations

import math

from ponder.errors import ConfigError

# -- the halting threshold ------------------------------------------------------------------------------------

# A token halts once its cumulative halting weight reaches the threshold; at 1.0 it never halts early.
THRESHOLD_LOW, THRESHOLD_HIGH = 0.0, 1.0  # the low end is excluded
THRESHOLD_RANGE = f"({THRESHOLD_LOW:g}, {THRESHOLD_HIGH:g}]"


def check_threshold(value: object, what: str = "act_threshold") -> float:
    """``value`` as a float in (0, 1], or a ConfigError naming ``what`` and the range.

    Used wherever a threshold comes in: a run config, a dial, the CLI, the tuner's grid, a served request."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} = {value!r} is not a number; give a threshold in {THRESHOLD_RANGE}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{what} = {value!r} is not a number; give a threshold in {THRESHOLD_RANGE}") from None
    if not (math.isfinite(number) and THRESHOLD_LOW < number <= THRESHOLD_HIGH):
        raise ConfigError(f"{what} = {value!r} is outside {THRESHOLD_RANGE}")
    return number


# The thresholds `ponder bench` and `ponder demo` measure: the tuner's grid and full depth (1.0) as the reference.
BENCH_THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.99, 1.0)

# -- the ACT tuner (seed 004's grid) -----------------------------------------------------------------------------

# 1.0 is left out on purpose: it never halts early, so tuning it only measures the full-depth model.
TUNE_THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.99)
TUNE_LAMBDAS = (0.001, 0.005, 0.01, 0.05, 0.1)
TUNE_SCORES = ("perplexity", "layers", "balanced")
TUNE_MODES = ("sweep", "full")
TUNE_SEARCHES = ("grid", "pareto")

# -- the language model ------------------------------------------------------------------------------------------

# Where a norm sits in ponder's language model. The registry knows one more position, ``conv``, for
# channels-first features (ponder.registry.NORM_POSITIONS), which a norm factory may be asked for too.
MODEL_NORM_POSITIONS = ("attn", "ffn", "final")

# -- export --------------------------------------------------------------------------------------------------------

# 23: attention is one ``Attention`` node and the MLP's GELU one ``Gelu`` (ONNX Runtime >= 1.23 runs both, fused
# kernels even inside the early-exit ``If`` branches); at 18 both decompose into a dozen elementwise nodes, and the
# graph ran 0.73x PyTorch eager at batch 8 (docs/export.md, "Where the time goes").
DEFAULT_OPSET = 23
MIN_OPSET = 18  # the traced pieces use opset-18 operators (ReduceMax with its axes as an input, among others)
# ponder export --precision, and the quality bound a low-precision export must keep against its float32 graph
PRECISIONS = ("fp32", "bf16", "int8")
MAX_PERPLEXITY_RATIO = 1.01  # low-precision perplexity / fp32 perplexity
MIN_ARGMAX_AGREEMENT = 0.99  # share of tokens whose most likely next token is fp32's

# -- serving ---------------------------------------------------------------------------------------------------------

# The largest --max-message-mb: gRPC keeps message limits in a signed 32-bit count of bytes.
MAX_MESSAGE_MB = 2047
