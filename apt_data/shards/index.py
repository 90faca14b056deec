"""The Parquet index of a shard set: its columns and metadata, writing it, finding and reading it.

One row per sample (label, sizes, token counts, byte offset and size of every member), so a loader
plans batches and per-rank work without opening a shard, then reads any sample with one seek.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from ..config import APTConfig
from ..io import atomic_write_bytes
from .errors import ShardStats
from .format import (CHECKSUM, EXTRA_MEMBERS, FORMAT_VERSION, INDEX_METADATA_KEY, MEMBERS, SampleRecord, json_bytes,
                     member_column)
from .reader import read_sample

PathLike = Union[str, os.PathLike]

__all__ = ["ShardIndex", "config_dict", "find_index", "index_columns", "index_row", "index_table", "read_index",
           "write_index"]


def config_dict(cfg: APTConfig) -> dict:
    """The JSON form of an APTConfig stored in the index metadata (and read back by `read_index`)."""
    return {"patch_size": cfg.patch_size, "num_scales": cfg.num_scales,
            "thresholds": list(cfg.thresholds), "scorer": cfg.scorer}


def index_columns(num_scales: int, masks: bool = False) -> list[str]:
    """Index columns in order (see docs/shards.md); ``masks``: with the mask member's (``seg_*``)."""
    members = MEMBERS + (EXTRA_MEMBERS if masks else ())
    return (["key", "shard", "label", "source", "orig_width", "orig_height", "width", "height"]
            + [f"tokens_s{s}" for s in range(num_scales)] + ["tokens"]
            + [f"{member_column(m)}_{what}" for m in members for what in ("offset", "size")]
            + [f"{member_column(m)}_{CHECKSUM}" for m in members])


def index_row(key: str, shard: str, meta: Mapping[str, Any], offsets: Mapping[str, tuple[int, int]],
              checksums: Optional[Mapping[str, int]] = None) -> dict:
    """One index row from a sample's metadata, member offsets (``-1``: missing) and CRC32Cs (``-1``: not
    verified); an extra member's (a mask's) columns when the sample has one."""
    row = {"key": key, "shard": shard, "label": int(meta["label"]), "source": str(meta.get("source", "")),
           "orig_width": int(meta["orig_width"]), "orig_height": int(meta["orig_height"]),
           "width": int(meta["width"]), "height": int(meta["height"])}
    for s, t in enumerate(meta["tokens"]):
        row[f"tokens_s{s}"] = int(t)
    row["tokens"] = int(sum(meta["tokens"]))
    for m in MEMBERS + tuple(m for m in EXTRA_MEMBERS if m in offsets):
        off, size = offsets.get(m, (-1, -1))
        c = member_column(m)
        row[f"{c}_offset"], row[f"{c}_size"] = int(off), int(size)
        row[f"{c}_{CHECKSUM}"] = int((checksums or {}).get(m, -1)) if off >= 0 else -1
    return row


def index_table(rows: Sequence[Mapping[str, Any]], num_scales: int):
    """Index rows as a pyarrow Table with the index column types (missing checksums or masks: ``-1``)."""
    import pyarrow as pa

    types = {"key": pa.string(), "shard": pa.string(), "source": pa.string(), "label": pa.int64()}
    member = ("_offset", "_size", f"_{CHECKSUM}")
    masks = any(f"{member_column(m)}_offset" in r for r in rows for m in EXTRA_MEMBERS)
    return pa.table({c: pa.array([r.get(c, -1) if c.endswith(member) else r[c] for r in rows], type=types.get(
        c, pa.int64() if c.endswith(member) else pa.int32())) for c in index_columns(num_scales, masks)})


def write_index(path: PathLike, rows: Union[Sequence[Mapping[str, Any]], Any], cfg: APTConfig,
                settings: Mapping[str, Any]) -> None:
    """Write the Parquet index atomically (``rows``: `index_row` dicts or an `index_table`);
    the APTConfig and ``settings`` go in the schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = rows if isinstance(rows, pa.Table) else index_table(rows, cfg.num_scales)
    meta = {"format_version": FORMAT_VERSION, "config": config_dict(cfg), **settings}
    table = table.replace_schema_metadata({INDEX_METADATA_KEY: json_bytes(meta)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


@dataclass(frozen=True)
class ShardIndex:
    """A shard set's index: the Parquet table, the APTConfig of its token counts, and ``settings``
    (image_size, crop, ...); shard paths are relative to ``root``."""

    table: Any  # pyarrow.Table
    config: APTConfig
    settings: dict
    root: Path

    def __len__(self) -> int:
        return self.table.num_rows

    def arrays(self) -> dict[str, np.ndarray]:
        """Every column as a numpy array (strings as object arrays)."""
        return {c: self.table.column(c).to_numpy(zero_copy_only=False) for c in self.table.column_names}

    def column(self, name: str) -> np.ndarray:
        return self.table.column(name).to_numpy(zero_copy_only=False)

    def token_counts(self) -> np.ndarray:
        """int64 ``[N, num_scales]`` tokens per scale of every sample, finest first."""
        return np.stack([self.column(f"tokens_s{s}") for s in range(self.config.num_scales)], axis=1).astype(np.int64)

    def shard_paths(self) -> list[Path]:
        """The shards of this index, in order (``settings['shards']``, else as first seen in the table)."""
        names = self.settings.get("shards") or list(dict.fromkeys(self.table.column("shard").to_pylist()))
        return [self.root / s for s in names]

    def row(self, i: int) -> dict:
        return {c: v[0] for c, v in self.table.slice(int(i), 1).to_pydict().items()}

    def read_sample(self, i: int, *, strict: bool = False, stats: Optional[ShardStats] = None,
                    validate: bool = False) -> Optional[SampleRecord]:
        """`read_sample` of row ``i``."""
        return read_sample(self.row(i), self.root, strict=strict, stats=stats, validate=validate)


def find_index(path: PathLike, split: str = "train") -> Path:
    """The index file: ``path`` itself, or ``path/<split>.parquet`` when ``path`` is a shard folder."""
    path = Path(path)
    if path.is_dir():
        found = path / f"{split}.parquet"
        if not found.is_file():
            have = sorted(p.name for p in path.glob("*.parquet"))
            raise ValueError(f"{path}: no index {found.name} (indexes here: {have or 'none'})")
        return found
    return path


def read_index(path: PathLike, split: str = "train") -> ShardIndex:
    """Read an index written by a shard build: a ``<prefix>.parquet`` file, or a shard folder and
    the split (prefix) to read from it."""
    import pyarrow.parquet as pq

    path = find_index(path, split)
    return index_from_table(pq.read_table(path), path, path.parent)


def index_from_table(table: Any, where: Any, root: Any) -> ShardIndex:
    """The `ShardIndex` of a Parquet ``table`` read from ``where`` (named in errors), its shard paths
    relative to ``root``: checks the format metadata and reads the config and settings from it."""
    raw = (table.schema.metadata or {}).get(INDEX_METADATA_KEY)
    if raw is None:
        raise ValueError(f"{where}: not an apt shard index (no {INDEX_METADATA_KEY.decode()} schema metadata)")
    meta = json.loads(raw)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{where}: index format version {meta.get('format_version')}, this code reads "
                         f"{FORMAT_VERSION}")
    cfg = APTConfig(**meta.pop("config"))
    return ShardIndex(table=table, config=cfg, settings=meta, root=root)
