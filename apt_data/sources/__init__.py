"""Loader sources: random-access samples with labels known up front (`Source`), and `open_source`.

`FolderSource` (an ImageNet-layout folder), `IndexSource` (shards with a Parquet index, read through a
range reader: local files, or at URLs through `open_remote`'s stack of HTTP/fsspec reading, retries,
read-ahead and an optional local `RangeCache`), `DatasetSource` (any map-style dataset of
``(image, label)`` items: torchvision, Hugging Face), `MaskFolderSource` (images paired with
segmentation masks, `open_mask_folder`). `has_split` asks whether a shard folder (a path or a URL)
holds a split's index.
"""
from .base import ImageData, Source
from .cache import CachedReader, RangeCache
from .dataset import DatasetSource
from .folder import FolderSource, MaskFolderSource, open_mask_folder
from .index import IndexSource, open_shards
from .readahead import ReadAhead
from .readers import FileReader, FsspecReader, RangeReader, Retrying
from .remote import has_split, open_remote
from .resolve import open_source

__all__ = ["CachedReader", "DatasetSource", "FileReader", "FolderSource", "FsspecReader", "ImageData", "IndexSource",
           "MaskFolderSource", "RangeCache", "RangeReader", "ReadAhead", "Retrying", "Source", "has_split",
           "open_mask_folder", "open_remote", "open_shards", "open_source"]
