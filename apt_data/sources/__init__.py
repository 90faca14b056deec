"""Loader sources: random-access samples with labels known up front (`Source`), and `open_source`.

`FolderSource` (an ImageNet-layout folder), `IndexSource` (shards with a Parquet index),
`RemoteIndexSource` (the same at fsspec URLs, with an optional local `RangeCache`), `DatasetSource` (any map-style dataset of ``(image, label)`` items: torchvision, Hugging Face),
`MaskFolderSource` (images paired with segmentation masks, `open_mask_folder`).
"""
from .base import ImageData, Source
from .cache import RangeCache
from .dataset import DatasetSource
from .folder import FolderSource, MaskFolderSource, open_mask_folder
from .index import IndexSource, open_shards
from .remote import RemoteIndexSource, open_remote
from .resolve import open_source

__all__ = ["DatasetSource", "FolderSource", "MaskFolderSource", "open_mask_folder", "ImageData", "IndexSource", "RangeCache", "RemoteIndexSource", "Source", "open_remote",
           "open_shards", "open_source"]
