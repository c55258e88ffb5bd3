"""Atomic files: a reader sees the old file or the new one, never half of one, and a process killed
while writing leaves no temporary file behind (where the file system supports unnamed files)."""
from __future__ import annotations

import errno
import os
import secrets
import tempfile
from typing import BinaryIO, Callable

import torch


def save(obj, path: str | os.PathLike) -> None:
    """torch.save(obj) to `path`, atomically (`write_atomically`)."""
    write_atomically(path, lambda file: torch.save(obj, file))


def load(path: str | os.PathLike, map_location=None):
    """Loads a checkpoint written by `save` (tensors and plain Python containers only)."""
    return torch.load(os.fspath(path), map_location=map_location, weights_only=True)


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Calls write(file) on a new file, flushes it to disk and only then puts it at `path`.

    On Linux the data goes to an unnamed file (O_TMPFILE) that gets a name only once complete, so a
    kill (even SIGKILL) mid-write leaves nothing; the name it then gets is renamed over `path` at
    once. Elsewhere a named temporary file beside `path` is used and removed on any exception
    (a SIGKILL can leave that one behind). Creates the parent directory if needed.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    prefix = f".{os.path.basename(path)}."
    temporary = None
    descriptor = _unnamed_file(directory)
    if descriptor is None:
        descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
            if temporary is None:  # name the finished unnamed file, then move it into place
                temporary = os.path.join(directory, f"{prefix}{secrets.token_hex(6)}.tmp")
                _name(file.fileno(), temporary)
        os.replace(temporary, path)  # atomic on POSIX and Windows when both are on one file system
    except BaseException:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _name(descriptor: int, path: str) -> None:
    """Links the unnamed file open at `descriptor` to `path`. linkat must follow the /proc link
    (AT_SYMLINK_FOLLOW), which os.link asks for only when given a directory descriptor."""
    directory = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.link(f"/proc/self/fd/{descriptor}", path, src_dir_fd=directory, follow_symlinks=True)
    finally:
        os.close(directory)


def _unnamed_file(directory: str) -> int | None:
    """A descriptor of a new unnamed file in `directory`, or None where that is not supported."""
    if not hasattr(os, "O_TMPFILE") or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o644)
    except OSError as error:
        if error.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
            return None
        raise
