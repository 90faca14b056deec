"""`open_source`: a `Source` for whatever names the data: a shard set, an image folder or a dataset object."""
from __future__ import annotations

import os
from typing import Any, Optional, Union

from .base import Source
from .dataset import DatasetSource, is_map_dataset
from .folder import FolderSource
from .index import open_shards
from .remote import is_remote_url, open_remote

__all__ = ["open_source"]


def open_source(source: Union[str, os.PathLike, Source, Any], remote: Optional[dict] = None) -> Source:
    """A `Source` for a shard folder (``shards`` or ``shards:val``), a Parquet index, a shard URL
    pattern (``shards/train-{000000..000003}.tar``, with an index beside it), any of these as an
    URL (``https://``, ``s3://``, ``file://``: `open_remote`, given ``remote`` as its keyword
    arguments, e.g. ``cache_dir``), an image folder, or a map-style dataset object of ``(image, label)``
    items (`DatasetSource`); a `Source` as is."""
    if isinstance(source, Source):
        return source
    if isinstance(source, (str, os.PathLike)):
        s = os.fspath(source)
        if is_remote_url(s):  # http(s):// (urllib3), file://, s3://, gs:// (fsspec): ranged reads
            return open_remote(s, **(remote or {}))
        src = open_shards(s)
        if src is not None:
            return src
        if os.path.isdir(s):
            return FolderSource(s)
        raise ValueError(f"{s}: not a shard folder, Parquet index, shard pattern or image folder")
    if is_map_dataset(source):
        return DatasetSource(source)
    raise TypeError(f"cannot load from a {type(source).__name__}: give a path, a Source or a map-style dataset")
