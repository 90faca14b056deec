"""Shards at URLs: `open_remote` reads a shard set's index from object storage or HTTP and gives an
`IndexSource` over the remote reader stack of `apt_data.sources.readers`, one ranged read per sample.
Addresses: a folder URL (``URL:split``), an index URL, or a shard URL pattern, ``index=`` apart; schemes
``http(s)://`` (`HTTPReader`), ``file://`` and any fsspec back-end (``apt[remote]``): docs/scale-out.md.
"""
from __future__ import annotations

import io
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any, Optional, Union

from ..shards.index import ShardIndex, index_from_table
from ..shards.urls import expand_urls
from .cache import CachedReader, RangeCache
from .index import IndexSource
from .readahead import ReadAhead
from .readers import FsspecReader, IOCounters, RangeReader, Retrying, retrying

__all__ = ["has_split", "is_remote_url", "open_remote", "read_remote_index"]

#: URL schemes handled here (anything with ``scheme://``, except plain local paths)
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
#: ``storage_options`` that the urllib3 reader takes; any other sends http(s) through fsspec
_HTTP_OPTIONS = ("headers", "deadline", "connect_timeout", "read_timeout")


def is_remote_url(source: Any) -> bool:
    """Is ``source`` a URL (``http://``, ``s3://``, ``file://``, ...)?"""
    return isinstance(source, str) and bool(_URL.match(source))


def _base_reader(url: str, storage_options: Optional[dict], counters: IOCounters):
    """The plain reader for URLs like ``url``: `HTTPReader` for http(s) unless ``storage_options`` ask
    for more than it takes, else an fsspec filesystem."""
    opts = dict(storage_options or {})
    if url.startswith(("http://", "https://")) and not set(opts) - set(_HTTP_OPTIONS):
        from .http import HTTPReader

        return HTTPReader(opts.pop("headers", None), counters=counters, **opts)
    return FsspecReader(url, {k: v for k, v in opts.items() if k not in _HTTP_OPTIONS[1:]})


def read_remote_index(url: str, storage_options: Optional[dict] = None, retries: int = 5,
                      backoff: float = 0.05) -> ShardIndex:
    """The Parquet index at ``url`` (or a local path) as a `ShardIndex` (``root``: the local folder, or
    for a URL ``/``: the source resolves shard names against the folder URL)."""
    from ..shards.index import read_index

    if not is_remote_url(url) or url.startswith("file://"):
        return read_index(url.removeprefix("file://"))
    import pyarrow.parquet as pq

    reader = _base_reader(url, storage_options, IOCounters())
    try:
        data = retrying(lambda: reader.read_all(url), f"reading {url}", retries, backoff)
    except FileNotFoundError as e:
        raise ValueError(f"{url}: no shard index there") from e
    return index_from_table(pq.read_table(io.BytesIO(data)), url, PurePosixPath("/"))


def _split_suffix(url: str) -> tuple[str, Optional[str]]:
    """``URL:val`` -> (URL, "val"); a port (digits only) is not a split."""
    m = re.match(r"^(.*://.*):([A-Za-z0-9_-]+)$", url)
    if m and not m.group(2).isdigit():
        return m.group(1), m.group(2)
    return url, None


def has_split(source: Union[str, os.PathLike], split: str, storage_options: Optional[dict] = None) -> bool:
    """Does the shard folder ``source`` (a local path or a URL) hold the index ``<split>.parquet``?"""
    s = os.fspath(source)
    if not is_remote_url(s) or s.startswith("file://"):
        return (Path(s.removeprefix("file://")) / f"{split}.parquet").is_file()
    url = f"{_split_suffix(s)[0].rstrip('/')}/{split}.parquet"
    return _base_reader(url, storage_options, IOCounters()).exists(url)


def open_remote(source: str, index: Optional[str] = None, split: Optional[str] = None, *,
                storage_options: Optional[dict] = None, deadline: Optional[float] = None, retries: int = 5,
                backoff: float = 0.05, inflight: int = 16, readahead: Optional[int] = None,
                readahead_bytes: Union[int, str] = "64MB", cache_dir: Optional[Union[str, os.PathLike]] = None,
                cache_size: Union[int, str] = "10GB") -> IndexSource:
    """An `IndexSource` for a shard folder, index or shard-pattern URL over the reader stack of the module
    doc (``deadline``: seconds per request; the others: `Retrying`, `ReadAhead` and `RangeCache`'s)."""
    if deadline is not None:
        storage_options = {**(storage_options or {}), "deadline": deadline}
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
    counters = IOCounters()
    reader: RangeReader = Retrying(_base_reader(base, storage_options, counters), retries, backoff, counters)
    reader = ReadAhead(reader, inflight, readahead, readahead_bytes, counters=counters)
    if cache_dir is not None:
        reader = CachedReader(reader, RangeCache(cache_dir, cache_size, count=counters.add))
    return IndexSource(idx, shards, reader=reader, base=base, name=source)
