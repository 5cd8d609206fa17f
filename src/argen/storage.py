"""Atomic file writes whose failures read as one line: what could not be written, and why.

A write goes to a temp file in the target folder, is fsynced and renamed over the target, so a kill or a full
disk never leaves a 0-byte or half-written file under the real name. Every storage failure (disk full, quota,
read-only or unwritable folder) becomes a `StorageError` naming the file, whatever library wrote it:
safetensors and torch report a full disk as their own exception types (`SafetensorError`, "enforce fail at
inline_container.cc"), which are translated here.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors import SafetensorError

from argen.errors import ConfigError, StorageError

_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file size limit exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied (the folder is not writable)",
    errno.EPERM: "permission denied (the folder is not writable)",
}
# Libraries that swallow the OSError still quote its errno ("os error 28", "[Errno 28]").
_ERRNO_IN_TEXT = re.compile(r"os error (\d+)|\[Errno (\d+)\]")
_MIN_FREE_BYTES = 1 << 20


def _probe_reason(folder: Path) -> str | None:
    """Why writing into `folder` fails, asked of the file system (for errors that lost their errno)."""
    try:
        fs = os.statvfs(folder)
    except OSError:
        return None
    if fs.f_flag & os.ST_RDONLY:
        return _REASONS[errno.EROFS]
    if fs.f_bavail * fs.f_frsize < _MIN_FREE_BYTES:
        return _REASONS[errno.ENOSPC]
    if not os.access(folder, os.W_OK):
        return _REASONS[errno.EACCES]
    return None


def storage_reason(error: BaseException, folder: Path) -> str | None:
    """A short cause if `error` is a storage failure (disk full, read-only, ...), else None (a bug: re-raise)."""
    code = error.errno if isinstance(error, OSError) else None
    if code is None:
        match = _ERRNO_IN_TEXT.search(str(error))
        code = int(match.group(1) or match.group(2)) if match else None
    if code in _REASONS:
        return _REASONS[code]
    if isinstance(error, OSError | SafetensorError) or "inline_container" in str(error):
        # The library's own text ("enforce fail at inline_container.cc") means nothing to a user; --debug shows it.
        return _probe_reason(folder) or "the write failed (a full disk, a quota or a file size limit?)"
    return None


def storage_error(error: BaseException, path: Path) -> StorageError | None:
    """`error` as a one-line StorageError about writing `path`, or None if it is not a storage failure."""
    if isinstance(error, StorageError):
        return error
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    reason = storage_reason(error, folder)
    return StorageError(f"{reason} while writing {path}") if reason else None


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call `write(tmp)` on a temp file beside `path`, fsync, then rename over `path`; StorageError on failure."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary readable files
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        translated = storage_error(e, path) if isinstance(e, Exception) else None
        if translated is None or translated is e:
            raise
        raise translated from e


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line to a log file (not atomic: a torn last line is dropped by its reader)."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        error = storage_error(e, Path(path))
        if error is None:
            raise
        raise error from e


def remove_stray_temp_files(folder: str | os.PathLike) -> int:
    """Delete temp files left by a writer that was killed mid-write; returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stray = list(folder.glob(".*.tmp"))
    for p in stray:
        p.unlink()
    return len(stray)


def image_format(path: str | os.PathLike) -> str:
    """Pillow's format name for `path`'s extension; ConfigError naming the extension if it has none."""
    suffix = Path(path).suffix.lower()
    formats = Image.registered_extensions()
    if suffix not in formats:
        raise ConfigError(f"cannot write an image to {path}: unknown extension {suffix!r}; use .png, .jpg or .webp")
    return formats[suffix]


def save_image(image: Image.Image, path: str | os.PathLike) -> None:
    """Write a PIL image atomically, in the format its extension names."""
    fmt = image_format(path)
    atomic_write(path, lambda tmp: image.save(tmp, format=fmt))


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Write arrays to an .npz atomically (through a file object: np.savez would append .npz to a temp name)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)
