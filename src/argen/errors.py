"""Errors a user can cause and fix. The CLI prints any of them as one line and exits non-zero.

Each subclasses the builtin that callers already catch (`ValueError`, `OSError`), so library users keep their
`except ValueError` and the CLI catches one family. A message names the bad thing and, where there is one,
the fix; it never shows a traceback or a library's internal advice.
"""

from __future__ import annotations

import math


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


# Checks the config dataclasses run in `__post_init__`, so a bad value fails at construction (from a preset
# override, `--set` or a checkpoint's config.json) with a message naming the field, not deep inside a layer.


def check_int(config: object, name: str, minimum: int = 1, optional: bool = False) -> None:
    """`config.name` must be an integer >= minimum (or None when `optional`)."""
    value = getattr(config, name)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{type(config).__name__}.{name} must be an integer >= {minimum}, got {value!r}")


def check_number(
    config: object,
    name: str,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
    optional: bool = False,
) -> None:
    """`config.name` must be a finite number within the given bounds (`above`/`below` exclusive, `at_least`/
    `at_most` inclusive), or None when `optional`."""
    value = getattr(config, name)
    if optional and value is None:
        return
    rules = [
        (above, ">", lambda v, b: v > b),
        (at_least, ">=", lambda v, b: v >= b),
        (below, "<", lambda v, b: v < b),
        (at_most, "<=", lambda v, b: v <= b),
    ]
    bounds = [(sign, bound, test) for bound, sign, test in rules if bound is not None]
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or not all(test(value, bound) for _, bound, test in bounds):
        wanted = " and ".join(f"{sign} {bound}" for sign, bound, _ in bounds)
        raise ConfigError(
            f"{type(config).__name__}.{name} must be a finite number{' ' + wanted if wanted else ''}, got {value!r}"
        )


def check_probability(config: object, name: str) -> None:
    """A dropout-like rate: in [0, 1)."""
    check_number(config, name, at_least=0.0, below=1.0)


def check_sizes(config: object, name: str, minimum: int = 1) -> None:
    """`config.name` must be a non-empty sequence of integers >= minimum (channel multipliers, scales)."""
    value = getattr(config, name)
    ok = isinstance(value, (tuple, list)) and len(value) > 0
    if not ok or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in value):
        raise ConfigError(
            f"{type(config).__name__}.{name} must be a non-empty list of integers >= {minimum}, got {value!r}"
        )


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint folder or one of its files does not exist (still a `FileNotFoundError` for old callers)."""


class WrongComponentError(CheckpointError, TypeError):
    """A checkpoint holds a different kind of component than the caller asked for (a tokenizer, not a generator)."""


class NonFiniteCheckpointError(NonFiniteError, CheckpointError):
    """A checkpoint whose weights hold NaN or infinity: corrupt, or saved by a run that diverged."""
