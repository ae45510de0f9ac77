"""Fails on import, as a plugin with a missing dependency would."""

import ponder_missing_dependency_xyz  # noqa: F401
