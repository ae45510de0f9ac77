"""Built-in controller plugins (plugin name ``ponder.control``)."""

from ponder.registry.hookspecs import hookimpl


@hookimpl
def register_controllers(register):
    register("adyt", "ponder.plugins.control.adyt:ADyTController",
             description="Updates ADyT layers' smoothed gradient norms after backward, before the optimizer step")
