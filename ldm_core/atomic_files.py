"""Replacing a file so that a reader, or a run killed half-way, sees the old file or the new one, never
half of one.

The new content goes to a temporary file beside the target (same folder, hence same file system, so the
final step is a rename), which `os.replace` then moves over the target in one step. A write that fails
removes its temporary file and leaves the target as it was.

A rename alone protects against a killed process, not against a crash of the machine: the file system
may persist the rename before the data. Where a crash must not lose the file (checkpoints, encoded latent
shards) pass `fsync=True`, which flushes the data before the rename, and `sync_folder=True`, which also
flushes the folder entry after it.
"""

from __future__ import annotations

import glob
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Union

Content = Union[bytes, str, Callable[[BinaryIO], object]]


def write_atomic(path: Union[str, Path], content: Content, *, fsync: bool = False,
                 sync_folder: bool = False) -> Path:
    """Replace `path` with `content` atomically and return it as a Path.

    Parameters:
        content: bytes; str (written as UTF-8); or a function that writes to the binary file it is given
            (e.g. `lambda fh: np.save(fh, array)`).
        fsync: flush the file's data to disk before the rename.
        sync_folder: flush the folder after the rename, so that the new name itself survives a crash.

    The temporary file, `.<name>.<pid>-<random>.tmp` beside `path`, is unique per call, so concurrent
    writers never write into each other's file; it is created with the permissions `open` would give.
    """
    path = Path(path)
    tmp, fd = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(content):
                content(fh)
            else:
                fh.write(content.encode("utf-8") if isinstance(content, str) else content)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_folder:
        fsync_folder(path.parent)
    return path


def leftover_temporaries(path: Union[str, Path]) -> list[Path]:
    """The temporary files that writes of `path` killed before their rename left beside it."""
    path = Path(path)
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))


def fsync_file(path: Union[str, Path]) -> None:
    """Flush a file that a library wrote by name (torch.save, safetensors) to disk."""
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def fsync_folder(path: Union[str, Path]) -> None:
    """Flush a folder's entries (names created, renamed or removed in it) to disk; best effort, since some
    platforms and file systems cannot open or fsync a folder."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temporary(path: Path) -> tuple[Path, int]:
    """Create a new, empty file beside `path` and open it for writing. O_EXCL, so two writers never share
    one; mode 0o666 less the umask, as `open` gives (tempfile.mkstemp's 0o600 would hide the result from
    other users once renamed)."""
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
