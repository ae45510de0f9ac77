"""ponder: adaptive-depth transformers built from plugins, exported with in-graph early exit, served over gRPC."""

__version__ = "0.1.0"

from ponder.registry.hookspecs import hookimpl, hookspec  # noqa: E402  (cheap: pluggy only, no torch)

__all__ = ["__version__", "hookimpl", "hookspec"]
