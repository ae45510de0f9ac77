"""A halting plugin written from docs/plugins.md alone (no torch at import)."""

from ponder import hookimpl


@hookimpl
def register_halting(register):
    register("halving", "ponder_kit_halt_impl:Halving")
