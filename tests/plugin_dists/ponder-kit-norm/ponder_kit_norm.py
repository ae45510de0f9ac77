"""A norm plugin written from docs/plugins.md alone (no torch at import)."""

from ponder import hookimpl


@hookimpl
def register_norms(register):
    register("softsign-norm", "ponder_kit_norm_impl:softsign_norm")
