"""`RemoteFiles`: ranged reads of shard URLs with retries, shared counters and a read-ahead pool.

The transport under `apt_data.sources.remote.RemoteIndexSource`: ``http(s)://`` through
`apt_data.sources.http.HTTPRanges` (unless ``storage_options`` hold more than ``headers``), every
other scheme through an fsspec file system. Transient errors are retried with backoff, permanent
ones (404, 403, a missing file) are not (`_retrying`); the counters of `COUNTERS` are shared by the
loader's forked workers; process-local state (clients, the thread pool, pending reads) is made
lazily in the process that reads.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence

from ..shards.reader import BLOCK
from .http import HTTPRanges

log = logging.getLogger("apt_data.sources")

__all__ = ["COUNTERS", "RemoteFiles"]

#: the counters of `RemoteIndexSource.io_stats`
COUNTERS = ("requests", "retries", "failed", "bytes", "merged", "cache_hits", "cache_misses", "cache_bytes",
            "cache_evicted", "cache_corrupt")


def _fsspec():
    try:
        import fsspec
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading shards from this URL needs fsspec: pip install 'apt[remote]' (plus s3fs for "
                          "s3://, gcsfs for gs://; http(s):// needs neither)") from e
    return fsspec


def _plain_http(urls: Sequence[str], storage_options: Optional[dict]) -> Optional[HTTPRanges]:
    """The standard-library HTTP client for ``urls`` when they are all http(s) and ``storage_options``
    ask for nothing it lacks (only ``headers``); else None (fsspec reads them)."""
    opts = dict(storage_options or {})
    if not urls or set(opts) - {"headers"} or not all(u.startswith(("http://", "https://")) for u in urls):
        return None
    return HTTPRanges(opts.get("headers"))


def _filesystem(url: str, storage_options: Optional[dict] = None):
    """A fresh fsspec filesystem for ``url`` (not the instance cache: one per process)."""
    fs, _ = _fsspec().core.url_to_fs(url, skip_instance_cache=True, **(storage_options or {}))
    return fs


def _is_permanent(e: BaseException) -> bool:
    """A missing or forbidden object: retrying will not help."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return True
    status = getattr(e, "status", None) or getattr(e, "code", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 425, 429)


def _retrying(fn: Callable[[], Any], what: str, retries: int, backoff: float,
              count: Optional[Callable[[str], None]] = None) -> Any:
    """``fn()``, retried ``retries`` times with exponential backoff on transient errors; a permanent
    one, or the last, is logged and raised as an OSError (``count``: "retries" / "failed" counters)."""
    delay = backoff
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - every back-end has its own error types
            permanent = _is_permanent(e)
            if permanent or attempt == retries:
                if count is not None:
                    count("failed")
                why = f"{type(e).__name__}: {e}" + ("" if permanent else f" (failed after {retries} retries)")
                log.warning("%s: %s", what, why)
                if isinstance(e, OSError):
                    raise
                raise OSError(why) from e
            if count is not None:
                count("retries")
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")


class RemoteFiles:
    """Ranged reads of a fixed list of shard URLs, by number: ``pread(shard, offset, n)``.

    Like `apt_data.shards.reader.ShardFiles`, but over HTTP (`HTTPRanges`) or fsspec, with retries, shared counters and a
    read-ahead of whole sample spans (``schedule``) by a small thread pool. Process-local state (the
    filesystem, the pool, the pending reads) is made lazily in the reading process.
    """

    def __init__(self, urls: Sequence[str], *, storage_options: Optional[dict] = None, retries: int = 5,
                 backoff: float = 0.05, inflight: int = 16, merge_gap: int = 4 * BLOCK):
        self.urls = list(urls)
        self.storage_options = dict(storage_options or {})
        self.retries, self.backoff = int(retries), float(backoff)
        self.inflight, self.merge_gap = max(0, int(inflight)), int(merge_gap)
        self._http = _plain_http(self.urls, self.storage_options)  # None: fsspec
        # shared by the loader's forked workers: made here, in the process that opens the source
        self._counters = mp.RawArray("q", len(COUNTERS))
        self._counter_lock = mp.Lock()
        self._local: Optional[dict] = None

    # -------------------------------------------------------------- process-local state
    def _state(self) -> dict:
        st = self._local
        if st is None or st["pid"] != os.getpid():
            st = self._local = {"pid": os.getpid(), "fs": None, "pool": None, "pending": {},
                                "lock": threading.Lock()}
        return st

    def _fs(self):
        st = self._state()
        if st["fs"] is None:
            with st["lock"]:  # the read-ahead threads share one filesystem (one connection pool)
                if st["fs"] is None:
                    st["fs"] = _filesystem(self.urls[0], self.storage_options)
        return st["fs"]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_local"] = None
        from multiprocessing.context import get_spawning_popen

        if get_spawning_popen() is None:  # a plain pickle: the counters go as values, not shared
            state["_counters"], state["_counter_lock"] = list(self._counters), None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if isinstance(self._counters, list):
            self._counters, self._counter_lock = mp.RawArray("q", self._counters), mp.Lock()

    def close(self) -> None:
        st = self._local
        if st is not None and st["pid"] == os.getpid() and st["pool"] is not None:
            st["pool"].shutdown(wait=False, cancel_futures=True)
            st["pool"] = None

    # -------------------------------------------------------------- counters
    def _count(self, name: str, n: int = 1) -> None:
        with self._counter_lock:
            self._counters[COUNTERS.index(name)] += n

    def stats(self) -> dict:
        """Requests, retries, failed reads (after all retries), bytes read, merged sample reads."""
        with self._counter_lock:
            return dict(zip(COUNTERS, list(self._counters)))

    # -------------------------------------------------------------- reads
    def fetch(self, shard: int, offset: int, n: int) -> bytes:
        """``n`` bytes at ``offset`` of shard ``shard`` (fewer at its end): one ranged read, retried."""
        url = self.urls[shard]

        def once() -> bytes:
            self._count("requests")
            if self._http is not None:  # (slices an answer that ignored the Range header itself)
                data = self._http.get(url, offset, offset + n)
            else:
                data = self._fs().cat_file(url, start=offset, end=offset + n)
                if len(data) > n:  # a server that ignored the Range header sent the whole object
                    data = data[offset:offset + n]
            self._count("bytes", len(data))
            return bytes(data)

        return _retrying(once, f"ranged read of {url} bytes {offset}-{offset + n}", self.retries, self.backoff,
                         self._count)

    def schedule(self, spans: Sequence[tuple[Any, int, int, int]],
                 skip: Optional[Callable[[tuple[Any, int, int, int]], bool]] = None) -> None:
        """Start reading ahead: ``(tag, shard, start, end)`` per sample (tags name the samples in
        `pread`'s ``tag``). Spans of one shard at most ``merge_gap`` bytes apart share one request.
        ``skip(span)``: true for spans not to read (cached), remembered until `pread` or `drop`."""
        if not self.inflight:
            return
        st = self._state()
        pending = st["pending"]
        todo = []
        for s in spans:
            if s[0] in pending:
                continue
            if skip is not None and skip(s):
                pending[s[0]] = None
            else:
                todo.append(s)
        todo.sort(key=lambda s: (s[1], s[2]))
        if not todo:
            return
        if st["pool"] is None:
            st["pool"] = ThreadPoolExecutor(self.inflight, thread_name_prefix="apt-remote")
        groups: list[list] = []
        for s in todo:
            g = groups[-1] if groups else None
            if g is not None and g[-1][1] == s[1] and s[2] - max(x[3] for x in g) <= self.merge_gap:
                g.append(s)
            else:
                groups.append([s])
        first = {s[0]: k for k, s in enumerate(spans)}
        groups.sort(key=lambda g: min(first[x[0]] for x in g))  # submitted in the order they are needed
        for g in groups:
            shard, start, end = g[0][1], g[0][2], max(x[3] for x in g)
            fut: Future = st["pool"].submit(self.fetch, shard, start, end - start)
            if len(g) > 1:
                self._count("merged", len(g) - 1)
            for tag, _, _, _ in g:
                pending[tag] = (shard, start, end, fut)

    def pread(self, shard: int, offset: int, n: int, tag: Any = None) -> bytes:
        """``n`` bytes at ``offset`` of shard ``shard``: from the read-ahead of sample ``tag`` when it
        covers them, else one ranged read now."""
        st = self._local
        ahead = None
        if st is not None and tag is not None and st["pid"] == os.getpid():
            ahead = st["pending"].pop(tag, None)
        if ahead is not None:  # None: a span `schedule` skipped
            a_shard, a_start, a_end, fut = ahead
            if a_shard == shard and a_start <= offset and offset + n <= a_end:
                data = fut.result()  # raises the read's OSError after its retries
                return data[offset - a_start:offset - a_start + n]
        return self.fetch(shard, offset, n)

    def forget(self, keep: Callable[[Any], bool]) -> None:
        """Drop read-aheads whose tag ``keep`` rejects (a new epoch's order)."""
        st = self._local
        if st is not None and st["pid"] == os.getpid():
            for tag in [t for t in st["pending"] if not keep(t)]:
                self.drop(tag)

    def drop(self, tag: Any) -> None:
        """Forget (and cancel) the read-ahead of sample ``tag``: it is not needed (read from the cache)."""
        st = self._local
        if st is not None and st["pid"] == os.getpid():
            ahead = st["pending"].pop(tag, None)
            if ahead is not None:
                ahead[3].cancel()
