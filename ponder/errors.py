"""Errors from a user's input (a config, a data folder, a checkpoint): one line, no traceback at the CLI."""


class PonderError(Exception):
    """Base class for errors the CLI prints as ``ponder: error: ...``."""


class ConfigError(PonderError, ValueError):
    """A run config with an unknown key, a bad value, or an unknown plugin."""


class DataError(PonderError):
    """Missing or unusable training data; the message says what to put where."""


class CheckpointError(PonderError):
    """A checkpoint that is missing, corrupt, or not a ponder checkpoint."""


class NotFoundError(PonderError, LookupError):
    """Something asked for by name that is not there: a model, a version of it, a model file."""


class UnavailableError(PonderError):
    """Something that is there but cannot be used now: a model that failed to load, a server shutting down."""


class BadRequestError(PonderError, ValueError):
    """A request the model cannot take (an input or a parameter out of range); the message names the field."""
