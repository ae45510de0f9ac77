"""Serving exported ponder models: the ONNX Runtime engine, the gRPC server and client (to come)."""
