"""Writing one shard: members in a fixed order with fixed tar metadata, to ``NAME.tmp``, renamed on commit."""
from __future__ import annotations

import contextlib
import io
import os
import tarfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np

from ..io import fsync_dir
from .format import BLOCK, KEY_RE, MASK_MEMBER, TAR_MODE, TAR_MTIME, json_bytes, member_checksum, npy_bytes

PathLike = Union[str, os.PathLike]

__all__ = ["ShardWriter"]


class ShardWriter:
    """Write one shard to ``NAME.tmp``; `commit` fsyncs and renames it. Fixed tar metadata and order, so
    equal input gives equal bytes. As a context manager: commit on success, remove on an exception."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self._file = open(self.tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        #: key -> {extension: CRC32C of the member's bytes}, for the index (`index_row`)
        self.checksums: dict[str, dict[str, int]] = {}

    def write(self, key: str, members: Mapping[str, bytes]) -> dict[str, tuple[int, int]]:
        """Add one sample's members (extension -> bytes) in sorted order -> {ext: (offset, size)}."""
        if not KEY_RE.match(key):
            raise ValueError(f"{self.path}: invalid sample key {key!r} (letters, digits, '_' and '-' only, <= 95 chars)")
        offsets, checksums = {}, {}
        for ext in sorted(members):
            data = bytes(members[ext])
            checksums[ext] = member_checksum(data)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), TAR_MTIME, TAR_MODE
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            start = self._tar.offset
            self._tar.addfile(info, io.BytesIO(data))
            assert self._tar.offset == start + BLOCK + -(-len(data) // BLOCK) * BLOCK
            offsets[ext] = (start + BLOCK, len(data))
        self.checksums[key] = checksums
        return offsets

    def write_sample(self, key: str, jpeg: bytes, label: int, meta: Mapping[str, Any],
                     scores: Optional[np.ndarray], mask: Optional[bytes] = None) -> dict[str, tuple[int, int]]:
        """Add a sample in the standard members (.cls, .jpg, .json, .npy; a mask's PNG bytes as .seg.png)."""
        members = {"cls": str(int(label)).encode("ascii"), "jpg": jpeg, "json": json_bytes(dict(meta))}
        if mask is not None:
            members[MASK_MEMBER] = bytes(mask)
        if scores is not None:
            scores = np.asarray(scores)
            if scores.dtype != np.float32 or scores.ndim != 1:
                raise ValueError(f"{self.path}: scores of {key!r} must be a flat float32 array, got {scores.dtype} {scores.shape}")
            members["npy"] = npy_bytes(scores)
        return self.write(key, members)

    def commit(self) -> int:
        """Finish the tar, fsync, rename into place; returns the shard's size in bytes."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return self.path.stat().st_size

    def abort(self) -> None:
        """Drop the shard: close and remove the ``.tmp`` file."""
        with contextlib.suppress(Exception):
            self._tar.close()
        self._file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
