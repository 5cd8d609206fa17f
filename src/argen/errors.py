"""Errors a user can cause and fix. The CLI prints any of them as one line and exits non-zero.

Each subclasses the builtin that callers already catch (`ValueError`, `OSError`), so library users keep their
`except ValueError` and the CLI catches one family. A message names the bad thing and, where there is one,
the fix; it never shows a traceback or a library's internal advice.
"""

from __future__ import annotations


class ArgenError(Exception):
    """A problem with what the user gave argen (a setting, a file, a folder), not a bug in argen."""


class ConfigError(ArgenError, ValueError):
    """An invalid setting or config field: out of range, inconsistent with another, unknown, or non-finite."""


class DataError(ArgenError, ValueError):
    """Input data argen cannot use: an image folder with no usable image, token shards of the wrong shape."""


class CheckpointError(ArgenError, ValueError):
    """A checkpoint that is missing, corrupt, hostile, non-finite, or does not match the model it loads into."""


class NonFiniteError(ArgenError, ValueError):
    """NaN or infinity where a number must be finite (weights, logits, a loss)."""


class StorageError(ArgenError, OSError):
    """Writing failed (disk full, read-only folder); the message says what was kept."""
