"""ONNX Runtime sessions for exported models, set up in one place: the export's check run and serving both open
theirs here.

Torch-free; onnxruntime itself is imported on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PROVIDERS = ["CPUExecutionProvider"]
QUIET = 3  # ONNX Runtime's log severity: errors only (its warnings about the graph are not the user's business)


def session_options(threads: int | None = None, *, spinning: bool = True) -> Any:
    """``onnxruntime.SessionOptions`` for a ponder model.

    ``threads``: ONNX Runtime's intra-op threads (None or 0: its own choice). ``spinning=False`` stops those
    threads busy-waiting after a run, which frees the CPU for a server's own threads and lets several sessions be
    timed interleaved fairly."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = QUIET
    return options


def open_session(path: str | Path, threads: int | None = None, *, spinning: bool = True) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU for the model at ``path``, with :func:`session_options`."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(threads, spinning=spinning), providers=PROVIDERS)
