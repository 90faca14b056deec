"""The project's one atomic writer: readers see the old file or the complete new one, never a part."""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, os.PathLike]

__all__ = ["atomic_write", "atomic_write_bytes", "fsync_dir"]


def fsync_dir(path: PathLike) -> None:
    """Make a rename in ``path`` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: PathLike, write: Callable[[Path], object], *, shared: bool = False,
                 durable: bool = True) -> None:
    """Call ``write(tmp)`` on ``PATH.tmp``, fsync it, rename it to ``path``; a failure changes nothing.
    ``shared``: concurrent writers (a cache) get ``PATH.<pid>.<thread>.tmp``; ``durable=False``: no fsync."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = f".{os.getpid()}.{threading.get_ident()}.tmp" if shared else ".tmp"
    tmp = path.with_name(path.name + suffix)
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes, **kw) -> None:
    """`atomic_write` of ``data`` (``kw``: its ``shared`` and ``durable``)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data), **kw)
