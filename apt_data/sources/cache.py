"""`RangeCache`: byte ranges of remote shards kept as files in a bounded local folder, and `CachedReader`,
the range reader that serves reads from it. One file per ``(URL, start, end)`` (magic, CRC32C, bytes),
written atomically without fsync and evicted least recently used, so processes share the folder without
locks: docs/scale-out.md, "A local cache for later epochs", gives the bounds.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Union

from ..io import atomic_write_bytes
from ..shards.format import member_checksum
from .readers import PerProcess, RangeReader, Span

log = logging.getLogger("apt_data.sources")

__all__ = ["CachedReader", "RangeCache", "parse_size"]

_MAGIC = b"APTC"
_HEADER = len(_MAGIC) + 4
_SUFFIX = ".bin"
#: the names of entries, temporary files and sub-folders: a scan looks at nothing else in the folder
_ENTRY = re.compile(r"[0-9a-f]{32}\.bin(\.\d+\.\d+\.tmp)?")
_SUB = re.compile(r"[0-9a-f]{2}")
#: temporary files older than this (seconds) are left over from a killed writer: a scan deletes them
_STALE_TMP = 600.0
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(size: Union[int, float, str]) -> int:
    """Bytes in ``size``: a number, or a string like ``"20GB"``, ``"500 MiB"``, ``"1.5g"`` (decimal units;
    ``KiB``..``TiB`` binary)."""
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        n = int(size)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"cache_size={size!r}: give bytes or a size like '20GB' or '500MiB'")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"cache_size={size!r}: must be positive")
    return n


def _entries(folder: Union[str, os.PathLike]) -> list[os.DirEntry]:
    """The entries of ``folder``; none when it cannot be read (removed meanwhile)."""
    try:
        return list(os.scandir(folder))
    except OSError:
        return []


class RangeCache(PerProcess):
    """Byte ranges in files under ``root``, at most about ``max_bytes`` in all; ``count(name, n)`` counts
    ``cache_hits``, ``cache_misses``, ``cache_bytes``, ``cache_evicted``, ``cache_corrupt``. Picklable."""

    def __init__(self, root: Union[str, os.PathLike], max_bytes: Union[int, float, str],
                 count: Optional[Callable[..., None]] = None):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = parse_size(max_bytes)
        self.slack = max(1, self.max_bytes // 64)
        self._count = count

    def _new_state(self) -> dict:
        return {"total": None, "since": 0, "lock": threading.Lock()}  # (bytes in the folder, written since a scan)

    def _counted(self, name: str, n: int = 1) -> None:
        if self._count is not None:
            self._count(name, n)

    def path(self, url: str, start: int, end: int) -> Path:
        """The entry file of bytes ``[start, end)`` of ``url``."""
        h = hashlib.blake2b(f"{url}\0{start}\0{end}".encode(), digest_size=16).hexdigest()
        return self.root / h[:2] / (h + _SUFFIX)

    # -------------------------------------------------------------- reads
    def get(self, url: str, start: int, end: int) -> Optional[bytes]:
        """The cached bytes ``[start, end)`` of ``url``, or None (a miss, or a damaged entry: deleted)."""
        path = self.path(url, start, end)
        try:
            raw = path.read_bytes()
        except OSError:  # not there, or evicted a moment ago
            self._counted("cache_misses")
            return None
        data = raw[_HEADER:]
        if len(raw) < _HEADER or raw[:len(_MAGIC)] != _MAGIC \
                or int.from_bytes(raw[len(_MAGIC):_HEADER], "little") != member_checksum(data):
            self.discard(url, start, end, "its CRC32C does not match")
            self._counted("cache_misses")
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # most recently used
        self._counted("cache_hits")
        self._counted("cache_bytes", len(data))
        return data

    def discard(self, url: str, start: int, end: int, why: str) -> None:
        """Delete a damaged entry (counted as ``cache_corrupt``): it is read from the store again."""
        path = self.path(url, start, end)
        log.warning("cache entry %s for %s bytes %d-%d is damaged (%s): deleted, reading the store again",
                    path, url, start, end, why)
        self._counted("cache_corrupt")
        with contextlib.suppress(OSError):
            path.unlink()

    def __contains__(self, key: tuple[str, int, int]) -> bool:
        """Is there an entry for ``(url, start, end)`` (not checked: `get` checks)?"""
        return self.path(*key).is_file()

    # -------------------------------------------------------------- writes
    def put(self, url: str, start: int, end: int, data: bytes) -> None:
        """Keep ``data`` (bytes ``[start, end)`` of ``url``), evicting old entries to stay in bounds.
        A failed write (disk full, folder removed) is logged and ignored: the cache is optional."""
        size = len(data) + _HEADER
        if size > self.max_bytes * 0.9:
            return
        st = self._state()
        with st["lock"]:
            if st["total"] is None or st["since"] + size > self.slack or st["total"] + size > self.max_bytes:
                self._evict(st, size)
            path = self.path(url, start, end)
            try:  # a unique temporary name per writer, no fsync: the entry's CRC catches a torn one
                atomic_write_bytes(path, _MAGIC + member_checksum(data).to_bytes(4, "little") + data, shared=True,
                                   durable=False)
            except OSError as e:
                log.warning("could not write cache entry %s: %s", path, e)
                return
            st["total"] += size
            st["since"] += size

    def scan(self) -> list[tuple[float, int, str]]:
        """``(mtime, size, path)`` of every entry now in the folder (temporary files included; stale
        ones from a killed writer deleted). Other files in the folder are left alone."""
        out, now = [], time.time()
        subs = [e.path for e in _entries(self.root) if _SUB.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
        for e in (e for sub in subs for e in _entries(sub) if _ENTRY.fullmatch(e.name)):  # (no other file)
            try:
                s = e.stat(follow_symlinks=False)
            except OSError:  # evicted by another process meanwhile
                continue
            if e.name.endswith(".tmp") and now - s.st_mtime > _STALE_TMP:
                with contextlib.suppress(OSError):
                    os.unlink(e.path)
            else:
                out.append((s.st_mtime, s.st_size, e.path))
        return out

    def disk_usage(self) -> int:
        """Bytes in the folder now (all entries, by every process)."""
        return sum(size for _, size, _ in self.scan())

    def _evict(self, st: dict, incoming: int) -> None:
        """Scan the folder and delete the least recently used entries until the total plus ``incoming``
        bytes is at most 90% of the bound."""
        entries = self.scan()
        total = sum(size for _, size, _ in entries)
        target = int(self.max_bytes * 0.9) - incoming
        evicted = 0
        for _, size, path in sorted(entries):  # oldest first
            if total <= target:
                break
            if path.endswith(".tmp"):  # another process is writing it
                continue
            try:
                os.unlink(path)
                evicted += 1
            except FileNotFoundError:  # evicted by another process: gone all the same
                pass
            except OSError:
                continue
            total -= size
        if evicted:
            self._counted("cache_evicted", evicted)
        st["total"], st["since"] = total, 0


class CachedReader(RangeReader):
    """Serves spans from a `RangeCache` and keeps the spans the caller `checked`; cached bytes the
    caller `rejected` are deleted and read from the store again."""

    def __init__(self, inner: RangeReader, cache: RangeCache):
        self.inner, self.cache = inner, cache

    def read_order(self, spans, skip=None) -> None:
        self.inner.read_order(spans, self.cache.__contains__)

    def prefetch(self, spans, skip=None) -> None:
        self.inner.prefetch(spans, self.cache.__contains__)

    def read(self, name: str, start: int, end: int) -> bytes:
        data = self.cache.get(name, start, end)
        if data is None:
            return self.inner.read(name, start, end)
        self.inner.passed((name, start, end))
        return data

    def checked(self, span: Span, data: bytes) -> None:
        if span not in self.cache:
            self.cache.put(*span, data)
        self.inner.checked(span, data)

    def rejected(self, span: Span, why: str) -> bool:
        if span in self.cache:
            self.cache.discard(*span, why)
            return True
        return self.inner.rejected(span, why)
