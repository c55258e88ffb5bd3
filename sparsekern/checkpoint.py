"""Atomic checkpoint files: a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
import zipfile

import torch


def save(obj, path: str | os.PathLike) -> None:
    """torch.save(obj) to a temporary file beside `path`, flushed to disk, then renamed over it.

    On any error (an unpicklable object, a full disk, an interrupt) the file at `path` is as
    before and no temporary file is left behind. `path` naming a directory raises
    IsADirectoryError before anything is written.
    """
    path = _checked_path(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"path {path!r} is a directory, not a checkpoint file")
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
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _sync_directory(directory)


def load(path: str | os.PathLike, map_location=None):
    """Loads a checkpoint written by `save` (tensors and plain Python containers only).

    A file that cannot be loaded (truncated, corrupt, holding objects other than tensors and
    containers, which are never unpickled, or tensors of a device this machine lacks) raises
    ValueError naming the file; a missing one FileNotFoundError. `map_location` (None, a device
    or its name, a dict of device names, or a callable, as for torch.load) is checked first.
    """
    path = _checked_path(path)
    _check_map_location(map_location)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, RuntimeError, ValueError,
            UnicodeDecodeError, AttributeError, ImportError, IndexError, KeyError) as error:
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path}: cannot load this checkpoint: {type(error).__name__}: {first_line}") from error


def _checked_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not isinstance(path, str):  # a bytes path
        path = os.fsdecode(path)
    if not path:
        raise ValueError("path must not be empty")
    return path


def _check_map_location(map_location) -> None:
    if map_location is None or callable(map_location):
        return
    devices = list(map_location.values()) if isinstance(map_location, dict) else [map_location]
    for device in devices:
        if not isinstance(device, (str, torch.device)):
            raise TypeError(f"map_location must be a device, a device name, a dict of them or a callable, "
                            f"got {type(device).__name__}")
        try:
            device = torch.device(device)
        except RuntimeError as error:
            raise ValueError(f"map_location names no device: {error}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"map_location={str(device)!r} but CUDA is not available")


def _sync_directory(directory: str) -> None:
    # The rename is durable only once the directory entry is on disk (POSIX; a no-op elsewhere).
    with contextlib.suppress(OSError, AttributeError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
