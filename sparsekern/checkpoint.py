"""Atomic files: a reader sees the old file or the new one, never half of one, and a process killed
while writing leaves no temporary file behind (where the file system supports unnamed files)."""
from __future__ import annotations

import collections
import contextlib
import errno
import io
import os
import pickle
import secrets
import stat
import tempfile
import zipfile
import zlib
from typing import BinaryIO, Callable

import torch


def save(obj, path: str | os.PathLike) -> None:
    """torch.save(obj) to `path`, atomically (`write_atomically`).

    On any error (an unpicklable object, a full disk, an interrupt) the file at `path` is as
    before and no temporary file is left behind, nor a folder on the way to it. `path` naming a directory (or ending
    in a separator) raises IsADirectoryError, and naming something other than a regular file (a FIFO,
    a device such as /dev/null, which the atomic rename would replace) ValueError, before anything
    is written. A symbolic link is followed: the file it points to is replaced, the link stays.
    An object that `load` would refuse to unpickle (a NumPy value, a dataclass or another class of your
    own, a slice, a range) raises TypeError naming its classes, with the file as before: saved, it would
    be found unloadable only when the run is resumed. Save such values as Python numbers, strings,
    tensors and containers (`.item()`, `torch.from_numpy`, `dataclasses.asdict`), or allow their
    classes with `torch.serialization.add_safe_globals`, which `load` then accepts too.
    """
    path = _checked_path(path)
    if os.path.isdir(path) or path.endswith((os.sep, os.altsep or os.sep)):
        raise IsADirectoryError(f"path {path!r} is a directory, not a checkpoint file")
    _check_regular(path, missing_ok=True)
    write_atomically(path, lambda file: _save_loadable(obj, file, path))


def _save_loadable(obj, file: BinaryIO, path: str) -> None:
    """torch.save(obj) into `file` (open for reading and writing), then TypeError naming the classes in what it
    wrote that `load`'s weights-only unpickler refuses. The check reads back the pickle only, not the tensors."""
    torch.save(obj, file)
    file.flush()
    file.seek(0)
    refused = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(file))
    if refused:
        raise TypeError(f"{path}: cannot save {', '.join(refused)}: sparsekern.checkpoint.load (torch.load with "
                        f"weights_only=True) would refuse to load them; save Python numbers, strings, tensors and "
                        f"containers instead (a NumPy value as .item() or torch.from_numpy, a dataclass as "
                        f"dataclasses.asdict), or allow them with torch.serialization.add_safe_globals")


def load(path: str | os.PathLike, map_location=None):
    """Loads a checkpoint written by `save` (tensors and plain Python containers only).

    A file that cannot be loaded (truncated, corrupt, holding objects other than tensors and
    containers, which are never unpickled, or tensors of a device this machine lacks) raises
    ValueError naming the file, caused by (`__cause__`) the error torch.load raised: a
    pickle.UnpicklingError where its weights-only unpickler refused what the file holds; so does
    one whose stored checksums (CRC-32 of every record of torch's zip format) do not match its
    contents, or whose record headers or zip directory are damaged, all of which torch.load alone
    would load silently; so does one with a tensor record of another size than its storage (which
    torch 2.9 loads, a short record's missing end left uninitialised); so does a file in torch's
    legacy format (`torch.save(..., _use_new_zipfile_serialization=False)`, or torch before 1.6), which
    stores no checksum at all, so that damage to its tensors could not be told from their values
    (`save` always writes the zip format); and a path that is not a regular file (a FIFO, which
    would block forever, a device); a missing one raises FileNotFoundError, and a directory
    IsADirectoryError. `map_location` (None, a device or its name, a dict of them, or a callable, as
    for torch.load) is checked first. The checksums and torch.load read one open file, so both see
    the same contents.
    """
    path = _checked_path(path)
    map_location = _check_map_location(map_location)
    _check_regular(path, missing_ok=False)
    # One open file: `save` replaces a checkpoint by renaming a new file over it, so reopening the
    # path for torch.load could read a file whose checksums were never tested. Reading through the
    # handle, rather than loading the whole file into memory first, keeps peak memory at one copy of
    # the loaded tensors.
    with open(path, "rb") as file:
        _refuse_legacy(path, file)
        file.seek(0)
        archive = _zip_archive(path, file)
        if archive is not None:
            with archive:   # closes the archive, not `file` (ZipFile closes only files it opened)
                _check_checksums(path, archive)
                _check_record_sizes(path, archive)
        file.seek(0)
        try:
            return torch.load(file, map_location=map_location, weights_only=True)
        except torch.OutOfMemoryError:   # the device, not the file: as it is, for a handler that loads elsewhere
            raise
        # TypeError and AssertionError: torch's loader meets a pickle's odd arguments (a persistent id that is no
        # tuple, a tensor rebuilt from too few arguments) in code of its own, which raises them naming no file.
        except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, RuntimeError, ValueError, OSError,
                UnicodeDecodeError, AttributeError, ImportError, IndexError, KeyError, TypeError,
                AssertionError) as error:
            # OSError: torch's zip reader raises EINVAL for a file cut after its data (no central
            # directory); any other is the storage failing (EIO, ESTALE), not the file, and stays one.
            if isinstance(error, OSError) and error.errno != errno.EINVAL:
                raise
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
    if "\0" in path:
        raise ValueError(f"path must not contain a NUL byte, got {path!r}")
    return path


def _check_regular(path: str, missing_ok: bool) -> None:
    """ValueError unless `path` (links followed) is a regular file, or missing and `missing_ok`."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if missing_ok:
            return
        raise FileNotFoundError(f"checkpoint {path!r} is missing") from None
    except OSError as error:  # e.g. a path below a file: refused as the write or torch.load would
        if missing_ok:
            return
        raise ValueError(f"{path}: cannot load this checkpoint: {error.strerror or error}") from None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"path {path!r} is a directory, not a checkpoint file")
    if not stat.S_ISREG(mode):
        raise ValueError(f"path {path!r} is not a regular file (a FIFO, socket or device), not a checkpoint file")


_ZIP_START = b"PK\x03\x04"   # a zip's first local header, which torch.load takes for its zip format
# torch's legacy format starts with its magic number, pickled alone under the protocol it was saved with.
_LEGACY_STARTS = tuple(pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=protocol)
                       for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1))


def _refuse_legacy(path: str, file) -> None:
    """ValueError naming the file (`path`, open as `file`) when it is in torch's legacy format: torch.load reads
    it, but it holds no checksum, so a damaged tensor would load as a valid one. (torch's older tar format is
    refused by torch.load itself under weights_only.)"""
    if file.read(max(map(len, _LEGACY_STARTS))).startswith(_LEGACY_STARTS):
        raise ValueError(f"{path}: cannot load this checkpoint: it is in torch's legacy format "
                         f"(torch.save(..., _use_new_zipfile_serialization=False), or torch before 1.6), which "
                         f"stores no checksums, so damage to it would load unnoticed; if you trust the file, load it "
                         f"with torch.load(path, weights_only=True) and save it again with sparsekern.checkpoint.save")


def _zip_archive(path: str, file) -> zipfile.ZipFile | None:
    """`file` (`path`, open) as a zip, its directory read once for both checks of its records; None where the
    storage fails or it is no zip: torch.load judges those. ValueError naming the file when it starts as a zip
    whose directory cannot be read."""
    try:
        return zipfile.ZipFile(file)
    except OSError:
        return None  # the storage failing, or a seek the file cannot take: torch.load meets it too
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as error:
        file.seek(0)
        if file.read(len(_ZIP_START)) != _ZIP_START:
            return None  # not a zip (garbage, or torch's tar format, which weights_only refuses)
        # torch.load reads it as a zip, with a reader that skips what zipfile checks (a damaged version field in
        # the directory): loaded, its records would go untested.
        raise ValueError(f"{path}: cannot load this checkpoint: it is damaged (its zip directory cannot be read: "
                         f"{type(error).__name__}: {error})") from None


def _check_checksums(path: str, archive: zipfile.ZipFile) -> None:
    """ValueError naming the file (`path`, read as `archive`) and the record when a record of a zip
    checkpoint fails its CRC-32, or cannot be read back at all (a damaged record header)."""
    try:
        damaged = archive.testzip()
    except OSError:
        return  # the storage failing, or a seek the file cannot take: torch.load meets it too
    # A zip whose records cannot be read back: a damaged header (a name's length, its flags) makes
    # zipfile raise where torch's reader, which skips those checks, reads the data at a wrong offset.
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, RuntimeError, zlib.error) as error:
        damaged = f"? ({type(error).__name__}: {error})"
    if damaged is not None:
        raise ValueError(f"{path}: cannot load this checkpoint: it is damaged (record {damaged!r} does not match "
                         f"its stored checksum)")


def _check_record_sizes(path: str, archive: zipfile.ZipFile) -> None:
    """ValueError naming the file (`path`, read as `archive`) and the record when a tensor's record holds another
    number of bytes than the storage its pickle declares for it: torch 2.9 loads a short record into a storage of
    the declared size, its end left uninitialised, and a long one cut short, both as valid tensors (torch 2.13
    refuses them; the check came with pytorch#165553, October 2025); and when the pickle gives a record an element
    count that is no int, or below 0 (torch.load raised a TypeError naming neither); and when the zip holds two
    records of one name. An archive this cannot read (no single data.pkl, a pickle it cannot walk) is left to
    torch.load, as is a storage type it does not know."""
    sizes = {info.filename: info.file_size for info in archive.infolist()}
    names = collections.Counter(info.filename for info in archive.infolist())
    twice = [name for name, count in names.items() if count > 1]
    if twice:
        # zipfile reads the last of them, torch's reader the one its search of the sorted directory meets
        # first: what this check and its checksums read could be another record than torch.load loads
        raise ValueError(f"{path}: cannot load this checkpoint: it is damaged (it holds {names[twice[0]]} records "
                         f"named {twice[0]!r}, which torch.save never writes: which of them a reader takes "
                         f"depends on the reader)")
    pickles = [name for name in sizes if name.rpartition("/")[2] == "data.pkl"]
    if len(pickles) != 1:
        return
    try:
        declared = _declared_storages(archive.read(pickles[0]))
    except Exception:  # noqa: BLE001 -- any pickle this walk cannot follow is torch.load's to judge
        return
    records = pickles[0][:-len("data.pkl")] + "data/"
    for storage_type, key, numel in declared:
        try:
            record = f"{records}{key}"
        except ValueError:   # an int key past Python's int-to-str limit: torch.load fails naming it so too
            continue
        if record not in sizes or isinstance(numel, _Placeholder) or isinstance(numel, type):
            # torch.load refuses a missing record itself, and a count made by a class the pickle imports (its
            # weights-only unpickler refuses the import: that file holds objects other than tensors)
            continue
        if type(numel) is not int or numel < 0:
            # torch.load raised a TypeError of its own for a float or str count, naming neither file nor record
            count = f"a storage of {integer_shown(numel)} elements" if type(numel) is int else \
                f"an element count that is a {type(numel).__name__}, not an int"
            raise ValueError(f"{path}: cannot load this checkpoint: it is damaged (its pickle gives record {record!r} "
                             f"{count})")
        try:
            itemsize = 1 if storage_type == "UntypedStorage" else \
                torch.serialization.StorageType(storage_type).dtype.itemsize
        except KeyError:
            continue
        if sizes[record] != numel * itemsize:
            raise ValueError(f"{path}: cannot load this checkpoint: it is damaged (record {record!r} holds "
                             f"{sizes[record]} bytes where its tensors' storage needs "
                             f"{integer_shown(numel * itemsize)})")


def integer_shown(value: int) -> str:
    """An int as an error line shows it: its digits up to 64 bits, past them its size ('an integer of 16612 bits'),
    as Python converts no int of more than 4300 digits to str (and thousands of digits would tell nothing). The digits
    are int's own: a subclass's repr, which an error line may be reporting as broken, is not called."""
    bits = int.bit_length(value)
    return int.__repr__(value) if bits <= 64 else f"an integer of {bits} bits"


class _Placeholder:
    """Whatever a checkpoint's pickle builds while `_declared_storages` walks it: it takes any arguments, state,
    items and calls, so that no class is imported and no code runs."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Placeholder()

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass

    def add(self, value):
        pass


class _StorageDeclarations(pickle._Unpickler):  # noqa: SLF001 -- the pure-Python unpickler, on purpose
    """Reads the storages a checkpoint's pickle declares, as (storage type name, record key, element count as
    declared, which may be no int): torch.save's persistent ids ("storage", type, key, location, count), its tag
    as str or bytes.

    The pure-Python unpickler, as torch.load's weights-only one is: the C one (pickle.Unpickler) keeps its memo in
    an array as long as the largest index a pickle stores at, filled on allocation, so that a data.pkl of ten bytes
    (a LONG_BINPUT at index 2**29) cost 8 GiB of memory, and at 2**31 more than most machines have."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.declared: list[tuple[str, object, object]] = []

    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        return type(name, (_Placeholder,), {})

    def persistent_load(self, pid):
        # torch.load decodes a bytes tag as ASCII, and reads record f"data/{key}" whatever the key (an int, bytes or
        # float names one too); a key this walk built (an object of a class the pickle imports) names none.
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage"):
            _, storage_type, key, _, numel = pid
            if isinstance(storage_type, type) and not isinstance(key, _Placeholder):
                self.declared.append((storage_type.__name__, key, numel))
        return _Placeholder()


def _latin1_bytes(text, encoding="utf-8"):
    """The bytes that protocol 2, which has no opcode for bytes, pickles as _codecs.encode(text, "latin1") (torch.load
    builds them so; a persistent id's tag or key may be bytes); a placeholder for any other call."""
    if isinstance(text, str) and encoding in ("latin1", "latin-1"):
        return text.encode("latin1")
    return _Placeholder()


def _declared_storages(data: bytes) -> list[tuple[str, object, object]]:
    unpickler = _StorageDeclarations(data)
    unpickler.load()
    return unpickler.declared


def _check_map_location(map_location):
    """`map_location` checked, its devices as names (torch.load takes only names in a dict)."""
    if map_location is None or callable(map_location):
        return map_location
    if isinstance(map_location, dict):
        for key in map_location:
            if not isinstance(key, (str, torch.device)):
                raise TypeError(f"map_location's keys must be device names, got {type(key).__name__}")
        return {str(key): _device_name(value) for key, value in map_location.items()}
    return _device_name(map_location)


def _device_name(device) -> str:
    """The name torch.load knows a map_location device by; ValueError for a device this machine lacks."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"map_location must be a device, a device name, a dict of them or a callable, "
                        f"got {type(device).__name__}")
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"map_location names no device: {error}") from None
    if device.type == "cpu":
        # torch.load knows the CPU only as "cpu": "cpu:0" failed as though the file were damaged.
        if device.index not in (None, 0):
            raise ValueError(f"map_location={str(device)!r} names no device: there is one CPU, 'cpu'")
        return "cpu"
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"map_location={str(device)!r} but CUDA is not available")
    backend = getattr(torch, device.type, None) if device.type not in ("meta", "cuda") else None
    if device.type not in ("meta", "cuda") and not (backend is not None and hasattr(backend, "is_available")
                                                    and backend.is_available()):
        raise ValueError(f"map_location={str(device)!r} but this machine has no {device.type} device")
    return str(device)


def _sync_directory(directory: str) -> None:
    # The rename is durable only once the directory entry is on disk (POSIX; a no-op elsewhere).
    with contextlib.suppress(OSError, AttributeError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def check_destination(path: str, argument: str, folder: bool = False) -> None:
    """ValueError (one line, naming `argument` and `path`) where nothing could be put at `path`, whatever the
    permissions: a folder (`folder`) where `path` is a file, a file where it ends in a separator, is a folder or
    is something other than a regular file (a FIFO, a device, which `write_atomically`'s rename would replace), and
    either where a file stands where one of its parent folders would be. Creates and writes nothing: run it before
    reading the inputs, and `check_writable_folder` (which creates the folder) after them."""
    kind = "folder" if folder else "file"
    if "\0" in path:   # os.stat and os.makedirs raise their own ValueError, which names no argument
        raise ValueError(f"{argument} {path!r} is not a writable {kind} (a path cannot hold a NUL byte)")
    if not folder and path.endswith((os.sep, os.altsep or os.sep)):
        raise ValueError(f"{argument} {path!r} ends in a separator: a folder, not a file")
    try:
        mode = os.stat(path).st_mode
    except OSError:   # missing, or under a file (NotADirectoryError): its nearest existing parent says which
        parent = _nearest_existing_parent(os.path.realpath(path) if os.path.islink(path) else path)
        if not os.path.isdir(parent):
            raise ValueError(f"{argument} {path!r} is not a writable {kind} ({parent!r} is a file, not a folder)")
        return
    if folder and not stat.S_ISDIR(mode):
        raise ValueError(f"{argument} {path!r} is a file, not a folder")
    if not folder and stat.S_ISDIR(mode):
        raise ValueError(f"{argument} {path!r} is a folder, not a file")
    if not folder and not stat.S_ISREG(mode):
        raise ValueError(f"{argument} {path!r} is not a regular file (a FIFO, socket or device), which writing "
                         f"would replace")


def _nearest_existing_parent(path: str) -> str:
    """The nearest parent of `path` that exists, walked as the system walks the path (`afile/../new` lies under
    the file `afile`, which os.path.abspath's textual '..' would skip)."""
    while True:
        parent = os.path.dirname(path) or os.curdir
        if parent == path or os.path.exists(parent):
            return parent
        path = parent


def check_writable_folder(path: str, argument: str) -> None:
    """Creates the folder `path` if needed and makes sure a file can be written in it; ValueError (one line,
    naming `argument`) if not (`check_destination` first). Run before the work whose results go there, so that
    none is lost to it."""
    check_destination(path, argument, folder=True)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ValueError(f"{argument} {path!r} is not a writable folder ({error.strerror or error})") from None


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Calls write(file) on a new file (open for reading and writing), flushes it to disk and only then puts it at
    `path`. A symbolic link at `path` is followed, as open() follows it: the file it points to is replaced (made, for
    a dangling link), the link stays. Something other than a regular file or folder there (a FIFO, a device, or a
    link to one) raises ValueError before anything is written: the rename would replace the node itself (a link
    to /dev/zero in a run folder replaced /dev/zero with a run's record).

    On Linux the data goes to an unnamed file (O_TMPFILE) that gets a name only once complete, so a
    kill (even SIGKILL) mid-write leaves nothing; the name it then gets is renamed over `path` at
    once. Elsewhere a named temporary file is used and removed on any exception (a SIGKILL can leave that one behind, in
    the nearest folder of `path`'s that exists). The folders on the way to `path` that do not exist are made only once
    the data is written (until then it is written in the nearest folder that exists, on the file system the new folders
    will be on), so a write that fails (an object that cannot be pickled, a full disk) leaves the file system as it was:
    removing a folder made for it, empty as it looked, could pull it from under another writer's unnamed file.
    """
    if not callable(write):
        raise TypeError(f"write must be a callable taking the open file, got {type(write).__name__}")
    given = os.fspath(path)
    path = os.path.realpath(given)
    try:   # stat follows the links, /proc's of open descriptors too (a pipe's realpath names no file: "pipe:[N]")
        mode = os.stat(given).st_mode
    except OSError:   # nothing there yet (or a dangling link): made
        mode = None
    if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        link = f" (a link to {path!r})" if path != os.path.abspath(given) else ""
        raise ValueError(f"path {given!r}{link} is not a regular file (a FIFO, socket or device), which writing would "
                         f"replace")
    directory = os.path.dirname(path)
    staging = directory if os.path.lexists(directory) else _nearest_existing_parent(directory)
    if not os.path.isdir(staging):   # a file where a folder would be: refused before the write, as the system does
        os.makedirs(directory, exist_ok=True)
    prefix = f".{os.path.basename(path)}."
    temporary = None
    descriptor = _unnamed_file(staging)
    if descriptor is None:
        descriptor, temporary = tempfile.mkstemp(dir=staging, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w+b") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
            os.makedirs(directory, exist_ok=True)
            if temporary is None:  # name the finished unnamed file, then move it into place
                temporary = os.path.join(directory, f"{prefix}{secrets.token_hex(6)}.tmp")
                _name(file.fileno(), temporary)
        os.replace(temporary, path)  # atomic on POSIX and Windows when both are on one file system
    except BaseException:
        if temporary is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        raise
    _sync_directory(directory)


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
        return os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o644)
    except OSError as error:
        if error.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
            return None
        raise
