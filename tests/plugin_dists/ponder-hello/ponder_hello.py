"""A third-party ponder plugin: registers the ``scalenorm`` norm (no torch at import)."""

from ponder import hookimpl


@hookimpl
def register_norms(register):
    register("ScaleNorm", "ponder_hello_layers:ScaleNorm", description="g * x / ||x|| with one learned scale")
