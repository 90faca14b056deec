"""Byte reading as a layer: the range-reader protocol, its local and fsspec readers, counters and retries.

A `RangeReader` reads bytes ``[start, end)`` of a named file. `IndexSource` reads each sample as one
span through a stack of small readers: `CachedReader` -> `ReadAhead` -> `Retrying` -> `FileReader`
| `FsspecReader` | `HTTPReader` (built by `open_remote`; local folders use a bare `FileReader`).
The optional methods (`read_order`, `prefetch`, `passed`, `checked`, `rejected`, `stats`) are hints
a wrapper passes down. Readers are picklable and make descriptors, clients and threads lazily in
the process that reads.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import time
from collections import OrderedDict
from typing import Any, Callable, Optional, Sequence

log = logging.getLogger("apt_data.sources")

__all__ = ["COUNTERS", "FileReader", "FsspecReader", "IOCounters", "PerProcess", "RangeReader", "Retrying",
           "Span", "is_permanent"]

#: ``(name, start, end)``: bytes ``[start, end)`` of the file ``name``
Span = tuple[str, int, int]
#: the counters of `IndexSource.io_stats`
COUNTERS = ("requests", "retries", "failed", "bytes", "merged", "cache_hits", "cache_misses", "cache_bytes",
            "cache_evicted", "cache_corrupt", "range_ignored")


class RangeReader:
    """Reads bytes ``[start, end)`` of named files. A reader over another (``inner``: a cache, a read-ahead,
    retries) passes the optional hints and feedback below down to it unless it overrides them."""

    inner: Optional[RangeReader] = None

    @property
    def reads_ahead(self) -> bool:
        """True when `read_order` is worth calling (a reader of the stack reads ahead along it)."""
        return self.inner is not None and self.inner.reads_ahead

    def read(self, name: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of ``name`` (fewer at its end). Raises OSError when unreadable."""
        raise NotImplementedError

    def read_order(self, spans: Sequence[Span], skip: Optional[Callable[[Span], bool]] = None) -> None:
        """A hint: the spans this process will read next, in order (``skip``: spans not to read ahead)."""
        if self.inner is not None:
            self.inner.read_order(spans, skip)

    def prefetch(self, spans: Sequence[Span], skip: Optional[Callable[[Span], bool]] = None) -> None:
        """A hint: start reading these spans now."""
        if self.inner is not None:
            self.inner.prefetch(spans, skip)

    def passed(self, span: Span) -> None:
        """The caller got ``span`` elsewhere (a cache): a read-ahead moves past it without reading it."""
        if self.inner is not None:
            self.inner.passed(span)

    def checked(self, span: Span, data: bytes) -> None:
        """``data``, read for ``span``, passed the caller's checks (a cache keeps it)."""
        if self.inner is not None:
            self.inner.checked(span, data)

    def rejected(self, span: Span, why: str) -> bool:
        """The bytes read for ``span`` failed the caller's checks; True: they came from a copy that is
        now dropped, so reading again gives the store's bytes."""
        return self.inner is not None and self.inner.rejected(span, why)

    def stats(self) -> dict:
        """Counters (`COUNTERS`) over all processes; empty for a reader that counts nothing."""
        return self.inner.stats() if self.inner is not None else {}

    def close(self) -> None:
        """Release this process's descriptors, connections and threads."""
        if self.inner is not None:
            self.inner.close()


class PerProcess:
    """State made lazily in the process that uses it (threads, locks, sockets): never pickled, and made
    afresh in a forked child (its parent's is not its own). Subclasses make it in `_new_state`."""

    _local: Optional[tuple[int, Any]] = None

    def __getstate__(self):
        return {**self.__dict__, "_local": None}

    def _new_state(self) -> Any:
        raise NotImplementedError

    def _state(self) -> Any:
        """This process's state, made now if there is none."""
        if self._local is None or self._local[0] != os.getpid():
            self._local = (os.getpid(), self._new_state())
        return self._local[1]

    def _made_here(self) -> Optional[Any]:
        """This process's state if it was made, else None."""
        return self._local[1] if self._local is not None and self._local[0] == os.getpid() else None


class FileReader(RangeReader):
    """Positional reads of local files through a few cached descriptors (LRU past ``max_open``); ``pread``
    keeps no position, so forked workers can share them."""

    def __init__(self, max_open: int = 32):
        self.max_open = int(max_open)
        self._fds: OrderedDict = OrderedDict()

    def __reduce__(self):
        return FileReader, (self.max_open,)  # (no descriptors)

    def read(self, name: str, start: int, end: int) -> bytes:
        fd = self._fds.pop(name, None)
        if fd is None:
            if len(self._fds) >= self.max_open:
                os.close(self._fds.popitem(last=False)[1])
            fd = os.open(name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._fds[name] = fd
        n = max(0, end - start)
        data = os.pread(fd, n, start)
        while len(data) < n:  # a short read: continue (or stop at the end of the file)
            more = os.pread(fd, n - len(data), start + len(data))
            if not more:
                break
            data += more
        return data

    def close(self) -> None:
        while getattr(self, "_fds", None):
            with contextlib.suppress(OSError):
                os.close(self._fds.popitem()[1])

    def __del__(self):
        self.close()


class FsspecReader(PerProcess, RangeReader):
    """Ranged reads of any fsspec URL (``file://``, ``s3://``, ``gs://``, ...): one filesystem per process,
    shared by its threads. A back-end that ignores the range and returns the whole object is sliced."""

    def __init__(self, url: str, storage_options: Optional[dict] = None):
        self.url, self.storage_options = url, dict(storage_options or {})

    def _new_state(self):
        """This process's filesystem (a fresh one, not fsspec's instance cache)."""
        try:
            import fsspec
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("reading shards from this URL needs fsspec: pip install 'apt[remote]' (plus s3fs "
                              "for s3://, gcsfs for gs://; http(s):// needs neither)") from e
        return fsspec.core.url_to_fs(self.url, skip_instance_cache=True, **self.storage_options)[0]

    fs = PerProcess._state

    def read(self, name: str, start: int, end: int) -> bytes:
        data = self.fs().cat_file(name, start=start, end=end)
        if len(data) > end - start:  # the whole object
            data = data[start:end]
        return bytes(data)

    def read_all(self, name: str) -> bytes:
        """The whole object ``name``."""
        return bytes(self.fs().cat_file(name))

    def exists(self, name: str) -> bool:
        return bool(self.fs().exists(name))


class IOCounters:
    """The counters of `COUNTERS`, shared by the loader's forked workers (made in the process that opens
    the source); a plain pickle carries their values."""

    def __init__(self):
        self._values = mp.RawArray("q", len(COUNTERS))
        self._lock = mp.Lock()

    def __getstate__(self):
        from multiprocessing.context import get_spawning_popen

        if get_spawning_popen() is None:  # a plain pickle: the values, not the shared memory
            return {"values": list(self._values)}
        return {"shared": (self._values, self._lock)}

    def __setstate__(self, state):
        if "shared" in state:
            self._values, self._lock = state["shared"]
        else:
            self._values, self._lock = mp.RawArray("q", state["values"]), mp.Lock()

    def add(self, name: str, n: int = 1) -> int:
        """Add ``n`` to counter ``name``; its new value."""
        k = COUNTERS.index(name)
        with self._lock:
            self._values[k] += n
            return self._values[k]

    def snapshot(self) -> dict:
        with self._lock:
            return dict(zip(COUNTERS, list(self._values)))


def is_permanent(e: BaseException) -> bool:
    """A missing or forbidden object: retrying will not help."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return True
    status = getattr(e, "status", None) or getattr(e, "code", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 425, 429)


def retrying(fn: Callable[[], Any], what: str, retries: int, backoff: float,
             count: Callable[[str], Any] = lambda name: None) -> Any:
    """``fn()``, retried ``retries`` times with exponential backoff on transient errors; a permanent
    one, or the last, is logged and raised as an OSError (``count``: "retries" / "failed" counters)."""
    delay = backoff
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - every back-end has its own error types
            permanent = is_permanent(e)
            if permanent or attempt == retries:
                count("failed")
                why = f"{type(e).__name__}: {e}" + ("" if permanent else f" (failed after {retries} retries)")
                log.warning("%s: %s", what, why)
                if isinstance(e, OSError):
                    raise
                raise OSError(f"{what}: {why}") from e
            count("retries")
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")


class Retrying(RangeReader):
    """Retries transient errors ``retries`` times with exponential backoff from ``backoff`` s; a permanent
    one (404, 403, a missing file) is raised at once. Counts requests, retries, failures and bytes."""

    def __init__(self, inner: RangeReader, retries: int = 5, backoff: float = 0.05,
                 counters: Optional[IOCounters] = None):
        self.inner, self.retries, self.backoff = inner, int(retries), float(backoff)
        self.counters = counters if counters is not None else IOCounters()

    def read(self, name: str, start: int, end: int) -> bytes:
        def once() -> bytes:
            self.counters.add("requests")
            data = self.inner.read(name, start, end)
            self.counters.add("bytes", len(data))
            return data

        return retrying(once, f"ranged read of {name} bytes {start}-{end}", self.retries, self.backoff,
                        self.counters.add)

    def stats(self) -> dict:
        return self.counters.snapshot()
