"""Crash-safe directory replacement and file writing shared by every checkpoint writer, and the errors a
full disk raises (saying so, with the free space left)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

# The most one os.write call is handed: Linux writes at most ~2 GiB per call anyway.
_WRITE_CHUNK = 1 << 30


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (new names, renames) so they survive a power loss.

    The one implementation for checkpoints, videos and prepared datasets. Windows cannot open a directory
    (no O_DIRECTORY); its renames are durable enough, so there this does nothing."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_text(path: Path, text: str, tmp_name: str | None = None) -> None:
    """`path` holds either its old or its new content, whatever happens: written to `tmp_name` beside it
    (default `.<name>.<pid>.tmp`), fsynced, renamed over it, and the rename made durable."""
    tmp = path.with_name(tmp_name or f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_durably(path: Path, obj) -> None:
    """Write `obj` as indented JSON to a new file (one inside a temporary directory that is renamed into place
    afterwards) and fsync it, so the rename publishes complete contents."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def replace_dir(tmp: Path, final: Path, aside_prefix: str) -> Path:
    """Rename the complete directory `tmp` to `final`. An existing `final` is first moved aside (to a
    name starting with `aside_prefix`, beside it) and deleted only after the rename succeeded, so at every
    instant one complete copy exists under a known name."""
    aside: Path | None = None
    if final.exists():
        aside = Path(tempfile.mkdtemp(prefix=aside_prefix, dir=final.parent))
        aside.rmdir()
        os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except BaseException:
        if aside is not None:
            os.rename(aside, final)
        raise
    fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return final


def write_file(path: Path, chunks: Iterable[bytes | memoryview]) -> int:
    """Create `path` (it must not exist), write `chunks` (consumed one at a time) and fsync it; returns the
    bytes written. Every byte goes through `os.write`, so a full disk raises at the write that hit it, as an
    OSError naming `path`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    total = 0
    try:
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while len(view):
                    written = os.write(fd, view[:_WRITE_CHUNK])
                    total += written
                    view = view[written:]
            os.fsync(fd)
        except OSError as e:
            if e.filename is not None:
                raise
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    finally:
        os.close(fd)
    return total


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def _free(directory: Path) -> str:
    try:
        return f"{_size(shutil.disk_usage(directory).free)} free on the file system of {directory}"
    except OSError as e:
        return f"free space of {directory} unknown ({e})"


def check_free_space(directory: Path, needed: int, what: str) -> None:
    """Raise OSError(ENOSPC) before anything is written when the file system of `directory` has less than
    `needed` bytes free; `what` names the save ("saving checkpoint <path>")."""
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise OSError(errno.ENOSPC, f"{what}: no space left on device: it needs {_size(needed)}, "
                                    f"{_size(free)} free on the file system of {directory}; nothing was written")


def write_error(error: OSError, what: str, directory: Path) -> OSError:
    """The error to raise for an OSError hit while writing the files of a save: it keeps the errno, says "no
    space left on device" for ENOSPC, names the file, the save (`what`) and the free space left."""
    reason = "no space left on device" if error.errno == errno.ENOSPC else (error.strerror or str(error))
    file = f" writing {error.filename}" if error.filename else ""
    return OSError(error.errno, f"{what} failed{file}: {reason} ({_free(directory)}); the partial save is "
                                f"removed and earlier checkpoints are untouched")
