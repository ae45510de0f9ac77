"""An optimizer plugin written from docs/plugins.md alone (no torch at import)."""

from ponder import hookimpl


@hookimpl
def register_optimizers(register):
    register("counted-sgd", "ponder_kit_optim_impl:CountedSGD")
