"""Serving exported ponder models: the ONNX Runtime engine, the gRPC server and client, and `ponder bench`."""

# Re-exported from ponder.limits, where each is written once (cheap to import: building the CLI's parsers reads them):
# DEFAULT_THRESHOLDS, the thresholds `ponder demo` and `ponder bench` measure; MAX_MESSAGE_MB, the largest
# --max-message-mb (gRPC counts message sizes in a signed 32-bit number of bytes).
from ponder.limits import BENCH_THRESHOLDS as DEFAULT_THRESHOLDS
from ponder.limits import MAX_MESSAGE_MB

__all__ = ["DEFAULT_THRESHOLDS", "MAX_MESSAGE_MB"]
