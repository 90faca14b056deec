"""Webdataset-compatible tar shards with precomputed APT score maps, and a Parquet index (docs/shards.md).

Modules: `errors`, `format` (members, validation), `reader`, `writer`, `encode`, `index`, `urls`,
`build` (imported on its own: ``from apt_data.shards.build import build_shards``).
"""
from ..io import atomic_write, atomic_write_bytes, fsync_dir
from ..listing import IMAGE_EXTENSIONS, list_image_folder, read_file_list
from .encode import EncodedSample, SourceError, encode_sample, sample_meta
from .errors import ShardDataError, ShardStats, Skipped
from .format import CHECKSUM, FORMAT_VERSION, INDEX_METADATA_KEY, MEMBERS, SampleRecord, split_scores
from .index import (ShardIndex, config_dict, find_index, index_columns, index_row, index_table, read_index,
                    write_index)
from .reader import iter_shard, iter_shards, read_record, read_sample, row_checksums
from .urls import expand_urls
from .writer import ShardWriter

__all__ = [
    "CHECKSUM", "EncodedSample", "FORMAT_VERSION", "IMAGE_EXTENSIONS", "INDEX_METADATA_KEY", "MEMBERS", "SampleRecord",
    "ShardDataError", "ShardIndex", "ShardStats", "ShardWriter", "Skipped", "SourceError",
    "atomic_write", "atomic_write_bytes", "config_dict", "encode_sample", "expand_urls", "find_index",
    "fsync_dir", "index_columns", "index_row", "index_table", "iter_shard", "iter_shards", "list_image_folder",
    "read_file_list", "read_index", "read_record", "read_sample", "row_checksums", "sample_meta", "split_scores", "write_index",
]
