"""Loader sources: random-access samples with labels known up front (`Source`), and `open_source`."""
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
