"""Crash-safe directory replacement shared by every checkpoint writer."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


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
