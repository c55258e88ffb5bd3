"""Atomic checkpoint files: a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import os
import tempfile

import torch


def save(obj, path: str | os.PathLike) -> None:
    """torch.save(obj) to a temporary file beside `path`, flushed to disk, then renamed over it."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)  # atomic on POSIX and Windows when both are on one file system
    except BaseException:
        os.unlink(temporary)
        raise


def load(path: str | os.PathLike, map_location=None):
    """Loads a checkpoint written by `save` (tensors and plain Python containers only)."""
    return torch.load(os.fspath(path), map_location=map_location, weights_only=True)
