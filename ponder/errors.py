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


# -- error messages that repeat what a client sent ------------------------------------------------------------

ECHO_CHARS = 64  # how much of a client's value an error message repeats


def echo(value: object, limit: int = ECHO_CHARS) -> str:
    """``repr(value)`` for an error message that repeats what a client sent, cut to its first ``limit`` characters
    (or bytes) with its length, e.g. ``'xxxx…' (20000 chars)``; a list or tuple item by item, at most 8 of them.

    A status message travels in gRPC metadata (8 KiB by default): one that repeated a long value whole would turn
    the answer into RESOURCE_EXHAUSTED."""
    if isinstance(value, (list, tuple)):
        items = [echo(v, limit) for v in value[:8]]
        more = [f"… ({len(value)} in all)"] if len(value) > 8 else []
        return "[" + ", ".join(items + more) + "]"
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[:limit]!r}… ({len(value)} {'chars' if isinstance(value, str) else 'bytes'})"
    text = repr(value)
    return text if len(text) <= 4 * limit else f"{text[:4 * limit]}… ({len(text)} chars)"


def cut(message: str, limit: int = 8 * ECHO_CHARS) -> str:
    """A message built elsewhere (which may repeat a client's value whole), cut to ``limit`` characters."""
    return message if len(message) <= limit else f"{message[:limit]}… ({len(message)} chars)"
