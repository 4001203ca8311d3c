"""Atomic files, the one helper both libraries write with: a reader sees the old file or the whole
new one (a temporary name, fsync, rename), never a partial file under the final name.

Callers choose the temporary name, which belongs to their folder's format (an output folder's
``<name>.tmp-<pid>``, ``shardformat.TMP_MARK``; a run folder's ``<name>.tmp``), so that each
knows what a killed writer may leave behind.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["commit", "fsync_dir", "write_atomic"]


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (no-op where directories cannot be opened)."""
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


def commit(tmp: Path, path: Path, *, sync_dir: bool = True) -> None:
    """Rename the finished (and fsynced) ``tmp`` over ``path``; ``sync_dir``: fsync the folder too,
    so that the rename itself survives a power loss."""
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)


def write_atomic(path: Path, write: Callable[[Path], object], *, tmp: Path, durable: bool = True,
                 sync_dir: bool = True) -> Path:
    """``write(tmp)``, fsync ``tmp``, rename it over ``path``. On any failure ``tmp`` is removed,
    the previous ``path`` kept and the exception raised again.

    ``durable``: fsync before the rename, so that even after a power loss the name never shows
    a partial file (skip it only for files whose readers check them anyway). ``sync_dir``: fsync
    the folder after the rename (with ``durable``); a caller writing many files can do that once
    with ``fsync_dir``."""
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir and durable:
        fsync_dir(path.parent)
    return path
