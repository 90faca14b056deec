"""Loader sources backed by shards written by ``tools/make_shards.py`` (or any webdataset tars)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from .config import APTConfig
from .loader import Source
from .shards import ShardIndex, expand_urls, find_index, read_index, read_sample
from .transforms import ImageTransform


class IndexSource(Source):
    """Samples of a Parquet index: every sample is one seek + read, labels and token counts known."""

    def __init__(self, index: ShardIndex, shards: Optional[list[str]] = None):
        table = index.table
        if shards is not None:  # keep only the rows of these shard files
            import pyarrow.compute as pc

            names = [os.path.relpath(os.path.abspath(s), index.root.resolve()) for s in shards]
            missing = set(names) - set(table.column("shard").to_pylist())
            if missing:
                raise ValueError(f"{index.root}: the index has no rows for shards {sorted(missing)}")
            table = table.filter(pc.is_in(table.column("shard"), value_set=__import__("pyarrow").array(names)))
        self.index, self.table = index, table
        self.keys = [str(k) for k in table.column("key").to_pylist()]
        self.labels = table.column("label").to_numpy().astype(np.int64)
        self._rows = table.to_pylist()  # small dicts: key, shard, offsets (no image data)

    def read(self, i: int) -> bytes:
        return self.read_record(i)[0]

    def read_record(self, i: int):
        rec = read_sample(self._rows[i], self.index.root, strict=True)
        return rec.jpeg, rec

    def image_size(self, i: int) -> Optional[tuple[int, int]]:
        row = self._rows[i]
        return int(row["stored_width"]), int(row["stored_height"])

    def exact_token_counts(self, cfg: APTConfig, transform: ImageTransform) -> Optional[np.ndarray]:
        """Index token counts, when the index was made for this config and transform output."""
        st = self.index.settings
        same = (self.index.config == cfg and transform.deterministic and st.get("image_size") == transform.size
                and bool(st.get("crop", True)) == (not transform.keep_aspect) and transform.crop_pct == 1.0
                and (transform.keep_aspect is False or st.get("multiple", cfg.patch_size) == transform.multiple))
        if not same:
            return None
        return np.asarray(self.table.column("tokens").to_numpy(), np.int64)

    def scores_usable(self, cfg: APTConfig, transform: ImageTransform) -> bool:
        return self.exact_token_counts(cfg, transform) is not None


def try_open(source: str, split: Optional[str] = None) -> Optional[Source]:
    """An `IndexSource` for ``shards/``, ``shards/train.parquet`` or ``shards/train-{0..3}.tar``.

    A folder may name its split as ``shards:val``. Returns None when ``source`` is not shards.
    """
    if ":" in source and not os.path.exists(source) and "://" not in source:
        source, split = source.rsplit(":", 1)
    p = Path(source)
    if source.endswith(".parquet"):
        return IndexSource(read_index(p))
    if p.is_dir() and list(p.glob("*.parquet")):
        return IndexSource(read_index(find_index(p, split or "train")))
    if source.endswith(".tar") or "{" in source or "::" in source:
        urls = expand_urls(source)
        first = Path(urls[0])
        candidates = sorted(first.parent.glob("*.parquet"))
        for idx in candidates:
            index = read_index(idx)
            have = set(index.table.column("shard").to_pylist())
            want = {os.path.relpath(os.path.abspath(u), idx.parent.resolve()) for u in urls}
            if want <= have:
                return IndexSource(index, shards=urls)
        raise ValueError(f"{source}: no Parquet index beside these shards covers them; "
                         "write one with tools/make_shards.py (it plans batches and seeks samples)")
    return None
