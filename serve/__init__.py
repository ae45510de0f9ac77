"""Serving exported ponder models: the ONNX Runtime engine, the gRPC server and client, and `ponder bench`."""

# The thresholds `ponder demo` and `ponder bench` measure by default (here, so that building the CLI's parsers stays
# light: ponder.serve.bench imports numpy).
DEFAULT_THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.99, 1.0)

# The largest --max-message-mb: gRPC keeps message limits in a signed 32-bit count of bytes.
MAX_MESSAGE_MB = 2047
