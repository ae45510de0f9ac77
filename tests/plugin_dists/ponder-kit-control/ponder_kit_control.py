"""A controller plugin written from docs/plugins.md alone (no torch at import)."""

from ponder import hookimpl


@hookimpl
def register_controllers(register):
    register("event-counter", "ponder_kit_control_impl:EventCounter")
