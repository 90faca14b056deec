"""The project's one atomic writer: write a temporary file, fsync it, rename it into place.

Readers of a file written this way see the old file or the complete new one, never a partial one.
Shards, the Parquet index, checkpoints, metrics and reports are all written through `atomic_write`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, os.PathLike]

__all__ = ["atomic_write", "atomic_write_bytes", "fsync_dir"]


def fsync_dir(path: PathLike) -> None:
    """Make a rename in ``path`` durable (a no-op where directories cannot be opened)."""
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


def atomic_write(path: PathLike, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on ``PATH.tmp``, fsync it, rename it to ``path``.

    A failed write leaves neither the ``.tmp`` file nor a change to ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """`atomic_write` of ``data``."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
