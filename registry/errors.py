"""Errors a user can act on: each names what is wrong and what would be valid."""

from __future__ import annotations


class PluginError(Exception):
    """Base class for registry errors."""


class UnknownKindError(PluginError, ValueError):
    """A plugin kind that does not exist."""


class UnknownPluginError(PluginError, LookupError):
    """No plugin of that kind has that name."""

    def __str__(self) -> str:  # LookupError would quote the message like a KeyError
        return str(self.args[0]) if self.args else ""


class PluginParameterError(PluginError, ValueError):
    """A parameter that the plugin's factory does not take, or of the wrong type."""


class PluginConflictError(PluginError):
    """Two providers registered the same name for one kind."""


class PluginLoadError(PluginError):
    """The plugin asked for failed to load; the cause is chained and quoted."""


class PluginLoadWarning(UserWarning):
    """A plugin failed to load; everything else still works."""
