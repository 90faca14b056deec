"""`RemoteIndexSource`: shards on object storage or HTTP (any fsspec URL), one ranged read per sample.

The Parquet index already holds every member's byte offset and size, so a sample is one ranged GET
of its members (`apt_data.shards.reader.read_record` checks what comes back against the index and
its checksums, exactly as for local files). No tar streaming and no shuffle buffer.

- **Addresses**: ``https://host/shards`` (the folder: ``train.parquet`` in it; ``URL:val`` for another
  split), ``https://host/shards/val.parquet``, ``https://host/shards/train-{000000..000003}.tar``
  (the index ``train.parquet`` beside them), or any of these with ``index=`` given apart (a local
  path or a URL). Schemes: ``http(s)://``, ``file://``, and whatever fsspec back-end is installed
  (``s3://`` needs ``s3fs``, ``gs://`` needs ``gcsfs``).
- **Per process**: the clients and the read-ahead threads are made lazily in the process that reads
  (after the loader's workers fork; never pickled), and reused for all its reads, so connections are
  kept alive. ``http(s)://`` shards are read by `apt_data.sources.http.HTTPRanges` (the standard
  library's client, one keep-alive connection per read-ahead thread: no event-loop hand-offs), unless
  ``storage_options`` hold more than ``headers``; every other scheme by an fsspec filesystem.
- **Retries**: a transient error (5xx, a reset or timed-out connection, any other OSError) is
  retried ``retries`` times with exponential backoff from ``backoff`` seconds; a permanent one
  (404, 403, a missing file) is not. A read that still fails raises `OSError`, which the shard
  reader reports as ``unreadable_shard`` (a `ShardDataError`, a ValueError): the loader logs, counts
  and skips the sample, or raises with ``strict=True``. `RemoteIndexSource.io_stats` counts
  requests, retries and failures over all processes (shared counters made before the fork).
- **Throughput**: inside an `APTLoader` worker the source knows the order in which the worker will
  read its samples (its planned bins, or its stream) and reads ahead of the reader, ``inflight`` (16)
  requests at a time, up to ``readahead`` samples (128; at most ``readahead_bytes``, 64 MB). It
  schedules them in chunks (when half the read-ahead is used up), so that samples of a chunk lying
  next to each other in one shard (an unshuffled plan: evaluation) share one request; a shuffled
  epoch reads one request per sample. `prefetch(ids)` does the same for any order a caller knows.
- **Cache** (off by default): with ``cache_dir``, each sample's span, once read and verified, is kept in
  that local folder (`apt_data.sources.cache.RangeCache`, at most ``cache_size``) for later epochs;
  cached bytes get the checks of bytes from the store, and fail them by being deleted and read again.

fsspec (with aiohttp) is the optional extra ``apt[remote]``, needed for ``file://``, ``s3://``, ``gs://``
and http with fsspec options; it is imported only here, and only when such a source is opened.
"""
from __future__ import annotations

import os
import re
import threading
from dataclasses import replace
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from ..shards.errors import ShardDataError
from ..shards.format import MEMBERS, SampleRecord
from ..shards.index import ShardIndex, index_from_table
from ..shards.reader import BLOCK
from ..shards.urls import expand_urls
from .cache import RangeCache, parse_size
from .index import IndexSource
from .remote_files import RemoteFiles, _filesystem, _plain_http, _retrying

__all__ = ["RemoteFiles", "RemoteIndexSource", "is_remote_url", "open_remote", "read_remote_index"]

#: URL schemes handled here (anything with ``scheme://``, except plain local paths)
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
def is_remote_url(source: Any) -> bool:
    """Is ``source`` an fsspec URL (``http://``, ``s3://``, ``file://``, ...)?"""
    return isinstance(source, str) and bool(_URL.match(source))


def read_remote_index(url: str, storage_options: Optional[dict] = None, retries: int = 5, backoff: float = 0.05):
    """The Parquet index at ``url`` (or a local path) as a `ShardIndex` (``root``: the local folder, or
    for a URL the folder URL as a string-like path; the source resolves shard names against it)."""
    from ..shards.index import read_index

    if not is_remote_url(url) or url.startswith("file://"):
        return read_index(url[len("file://"):] if url.startswith("file://") else url)
    import io

    import pyarrow.parquet as pq


    http = _plain_http([url], storage_options)
    whole = http.get if http is not None else _filesystem(url, storage_options).cat_file
    try:
        data = _retrying(lambda: whole(url), f"reading {url}", retries, backoff)
    except FileNotFoundError as e:
        raise ValueError(f"{url}: no shard index there") from e
    from pathlib import PurePosixPath

    return index_from_table(pq.read_table(io.BytesIO(data)), url, PurePosixPath("/"))


class RemoteIndexSource(IndexSource):
    """`IndexSource` over shards at fsspec URLs: the same samples, checks and skips, read by byte range.

    ``index``: a `ShardIndex` (`read_remote_index`); ``base``: the URL of the folder its shard
    names are relative to; ``shards``: keep only these shard names (relative to ``base``).
    ``retries``, ``backoff``: see the module doc; ``inflight``: read-ahead threads per process
    (0: none); ``readahead``: samples read ahead (default ``8 * inflight``), at most
    ``readahead_bytes`` (bytes or ``"64MB"``) of them; ``cache_dir``: keep the
    samples' byte spans in this local folder, at most ``cache_size`` (bytes or ``"20GB"``) in all
    (`RangeCache`; default: no cache).
    """

    def __init__(self, index: ShardIndex, base: str, shards: Optional[Sequence[str]] = None, *,
                 storage_options: Optional[dict] = None, retries: int = 5, backoff: float = 0.05,
                 inflight: int = 16, readahead: Optional[int] = None, readahead_bytes: Union[int, str] = "64MB",
                 name: Optional[str] = None,
                 cache_dir: Optional[Union[str, os.PathLike]] = None, cache_size: Union[int, str] = "10GB"):
        if shards is not None:
            import pyarrow as pa
            import pyarrow.compute as pc

            table = index.table
            missing = set(shards) - set(table.column("shard").to_pylist())
            if missing:
                raise ValueError(f"{base}: the index has no rows for shards {sorted(missing)}")
            index = replace(index, table=table.filter(pc.is_in(table.column("shard"), value_set=pa.array(list(shards)))))
        super().__init__(index)
        self.name = name or base
        self.base = base.rstrip("/")
        self._shard_paths = [f"{self.base}/{n}" for n in self._shard_names]
        self._files = RemoteFiles(self._shard_paths, storage_options=storage_options, retries=retries,
                                  backoff=backoff, inflight=inflight)
        self.readahead = 8 * int(inflight) if readahead is None else int(readahead)
        self.readahead_bytes = parse_size(readahead_bytes)
        self._order: Optional[tuple] = None  # (process, {sample: position}, order, [read ahead up to]): read_order
        starts = [o for m, (o, _) in self._spans.items()]
        ends = [np.where(o >= 0, o + n, -1) for o, n in self._spans.values()]
        present = [np.where(o >= 0, o, np.iinfo(np.int64).max) for o in starts]
        self._span_start = np.min(np.stack(present), axis=0) - BLOCK
        end = np.max(np.stack(ends), axis=0)
        self._span_end = self._span_start + -(-(end - self._span_start) // BLOCK) * BLOCK
        self._cache = None if cache_dir is None else RangeCache(cache_dir, cache_size, count=self._files._count)
        self._via: dict[int, Callable[[int, int], bytes]] = {}  # thread -> fetch of the read in progress

    def io_stats(self) -> dict:
        """``requests``, ``retries``, ``failed`` (reads given up), ``bytes``, ``merged``, and the cache's
        ``cache_hits``, ``cache_misses``, ``cache_bytes``, ``cache_evicted``, ``cache_corrupt``, over all processes."""
        return self._files.stats()

    # -------------------------------------------------------------- read-ahead
    def prefetch(self, ids: Sequence[int]) -> None:
        """Start reading samples ``ids`` (their whole spans) in the background (those cached: not)."""
        cache, paths = self._cache, self._shard_paths
        skip = None if cache is None else (lambda s: (paths[s[1]], s[2], s[3]) in cache)
        self._files.schedule([(int(i), int(self._shard_of[i]), int(self._span_start[i]), int(self._span_end[i]))
                              for i in ids], skip)

    def read_order(self, ids: Sequence[int]) -> None:
        """The samples this process will read next, in order: each read then starts the reads of the
        next ``readahead`` samples along it (the loader's workers call this with their bins or stream)."""
        order = np.asarray(ids, np.int64).reshape(-1)
        where: dict[int, int] = {}
        for k, s in enumerate(order.tolist()):
            where.setdefault(int(s), k)
        self._files.forget(where.__contains__)
        self._order = (os.getpid(), where, order, [0])

    def _read(self, i: int, members: Sequence[str] = MEMBERS, parse_meta: bool = True) -> SampleRecord:
        if self.readahead > 0 and self._files.inflight > 0 and self._order is not None \
                and self._order[0] == os.getpid():
            _, where, order, upto = self._order
            k = where.get(int(i))
            # read ahead in chunks (when half the read-ahead is used up), not one sample a time: the
            # samples of a chunk lying next to each other in a shard (an unshuffled plan) share a request
            if k is not None and k + 1 + self.readahead // 2 > upto[0]:
                ids = order[k:k + 1 + self.readahead]
                size = np.cumsum(self._span_end[ids] - self._span_start[ids])
                ids = ids[:max(1, int(np.searchsorted(size, self.readahead_bytes, side="right")))]
                self.prefetch(ids.tolist())
                upto[0] = k + len(ids)
        if self._cache is None:
            return super()._read(i, members, parse_meta)
        return self._read_cached(int(i), members, parse_meta)

    def _read_cached(self, i: int, members: Sequence[str], parse_meta: bool) -> SampleRecord:
        """`_read` through the cache: the sample's whole span from the cache, else from the store (then
        cached once the reader's checks passed). Cached bytes that fail the checks are deleted and read again."""
        cache, shard = self._cache, int(self._shard_of[i])
        url, start, end = self._shard_paths[shard], int(self._span_start[i]), int(self._span_end[i])
        span = [cache.get(url, start, end)]

        def fetch(offset: int, n: int) -> bytes:  # the reader asks within the span (block-aligned)
            if not start <= offset <= offset + n <= end:  # not expected: read it, as without a cache
                return self._files.pread(shard, offset, n, tag=i)
            if span[0] is None:
                span[0] = self._files.pread(shard, start, end - start, tag=i)
            return span[0][offset - start:offset - start + n]

        if span[0] is not None:
            self._files.drop(i)
            try:
                return self._read_via(i, members, parse_meta, fetch)
            except ShardDataError as e:  # bytes cached from another version of the shard, or damaged
                cache.discard(url, start, end, f"{e.reason}: {e.detail}")
                span[0] = None
        rec = self._read_via(i, members, parse_meta, fetch)
        if span[0] is not None:
            cache.put(url, start, end, span[0])
        return rec

    def _read_via(self, i: int, members: Sequence[str], parse_meta: bool,
                  fetch: Callable[[int, int], bytes]) -> SampleRecord:
        """`IndexSource._read` (its checks) over ``fetch`` instead of `_fetcher`'s."""
        me = threading.get_ident()
        self._via[me] = fetch
        try:
            return super()._read(i, members, parse_meta)
        finally:
            self._via.pop(me, None)

    def _fetcher(self, i: int, shard: int):
        via = self._via.get(threading.get_ident())
        if via is not None:
            return via
        files, tag = self._files, int(i)
        return lambda offset, n: files.pread(shard, offset, n, tag=tag)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_order"], state["_via"] = None, {}
        return state


def _split_suffix(url: str) -> tuple[str, Optional[str]]:
    """``URL:val`` -> (URL, "val"); a port (digits only) is not a split."""
    m = re.match(r"^(.*://.*):([A-Za-z0-9_-]+)$", url)
    if m and not m.group(2).isdigit():
        return m.group(1), m.group(2)
    return url, None


def open_remote(source: str, index: Optional[str] = None, split: Optional[str] = None, *,
                storage_options: Optional[dict] = None, **kw) -> RemoteIndexSource:
    """A `RemoteIndexSource` for a shard folder URL, an index URL or a shard URL pattern (see the
    module doc). ``index``: the index elsewhere (a local path or URL); ``kw``: `RemoteIndexSource`'s."""
    source, named = _split_suffix(source)
    split = split or named or "train"
    shards: Optional[list[str]] = None
    if source.endswith(".tar") or "{" in source or "::" in source:
        urls = expand_urls(source)
        base = urls[0].rsplit("/", 1)[0]
        if any(u.rsplit("/", 1)[0] != base for u in urls):
            raise ValueError(f"{source}: shards in several folders; give them one folder each")
        shards = [u.rsplit("/", 1)[1] for u in urls]
        index_url = index or f"{base}/{shards[0].rsplit('-', 1)[0]}.parquet"
    elif source.endswith(".parquet"):
        index_url, base = index or source, source.rsplit("/", 1)[0]
    else:
        base = source.rstrip("/")
        index_url = index or f"{base}/{split}.parquet"
    idx = read_remote_index(index_url, storage_options)
    return RemoteIndexSource(idx, base, shards, storage_options=storage_options, name=source, **kw)
