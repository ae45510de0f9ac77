"""Serving imports nothing that imports torch: a server, a client or `ponder bench` starts without it."""

from __future__ import annotations

import subprocess
import sys

SERVING = ("ponder.serve.server", "ponder.serve.bench", "ponder.serve.commands", "ponder.serve.client",
           "ponder.serve.engine", "ponder.serve.repository", "ponder.serve.requests", "ponder.serve.protocol",
           "ponder.model_repository", "ponder.text", "ponder.onnx_runtime", "ponder.plots", "ponder.limits",
           "ponder.tokens")


def test_serving_modules_import_without_torch():
    code = ("import importlib, sys\n"
            f"for name in {SERVING!r}:\n"
            "    importlib.import_module(name)\n"
            "heavy = sorted(m for m in ('torch', 'ponder.data', 'ponder.model', 'ponder.export', 'ponder.checkpoint')"
            " if m in sys.modules)\n"
            "print(','.join(heavy))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"importing serving loaded {proc.stdout.strip()}"


def test_the_repository_speaks_the_domains_errors_not_grpc():
    """Below the server the errors are ponder's (NotFoundError, UnavailableError, ...); server.status_of alone maps
    them to gRPC status codes."""
    code = "import sys\nimport ponder.serve.repository\nprint('grpc' in sys.modules)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stdout + proc.stderr


def test_one_place_maps_errors_to_status_codes(caplog):
    import grpc

    from ponder.errors import BadRequestError, ConfigError, NotFoundError, PonderError, UnavailableError
    from ponder.serve.protocol import RequestError
    from ponder.serve.server import status_of

    assert status_of(RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full")) == \
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "full")
    assert status_of(NotFoundError("no model 'x'")) == (grpc.StatusCode.NOT_FOUND, "no model 'x'")
    assert status_of(UnavailableError("not ready")) == (grpc.StatusCode.UNAVAILABLE, "not ready")
    assert status_of(BadRequestError("bad input")) == (grpc.StatusCode.INVALID_ARGUMENT, "bad input")
    assert status_of(ConfigError("act_threshold = 2 is outside (0, 1]"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert not caplog.records  # the domain's errors are answers, not faults
    for fault in (ZeroDivisionError("division by zero"), PonderError("a bare one")):
        code, message = status_of(fault)
        assert code == grpc.StatusCode.INTERNAL and message == f"internal error: {type(fault).__name__}: {fault}"
    assert [r.message for r in caplog.records] == ["internal error", "internal error"]
    assert all(r.exc_info for r in caplog.records)  # logged with the traceback
