"""`IndexSource`: the samples of a shard set's Parquet index, and recognising a shard address (`open_shards`).

Labels, sizes and exact token counts come from the index; each sample is one ranged read through a
range reader, checked by `read_record` against the index and its checksums.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..config import APTConfig
from ..shards.errors import ShardDataError
from ..shards.format import CHECKSUM, EXTRA_MEMBERS, INPLACE_FORMAT, MASK_MEMBER, MEMBERS, SampleRecord, member_column
from ..shards.index import ShardIndex, read_index
from ..shards.reader import BLOCK, image_ext_spans, read_record
from ..shards.urls import expand_urls
from ..transforms import ImageTransform
from .base import Source
from .readers import FileReader, RangeReader, Span

log = logging.getLogger("apt_data.sources")


@functools.lru_cache(maxsize=None)
def _warn_once(key: str, message: str) -> None:
    """Log ``message`` once per process for ``key``."""
    log.warning("%s", message)


__all__ = ["IndexSource", "open_shards"]


class IndexSource(Source):
    """Samples of a Parquet index, each one ranged read of its members.

    ``reader``: the `RangeReader` (default: local files); ``base``: the folder or URL shard names are
    relative to (default: the index's); ``shards``: keep only these shard files. Bad samples raise
    `ShardDataError` (a ValueError: the loader skips it unless strict).
    """

    def __init__(self, index: ShardIndex, shards: Optional[Sequence[str]] = None,
                 reader: Optional[RangeReader] = None, *, base: Optional[str] = None, name: Optional[str] = None):
        table = index.table
        where = base if base is not None else str(index.root)
        if shards is not None:
            import pyarrow as pa
            import pyarrow.compute as pc

            names = list(shards) if base is not None else \
                [os.path.relpath(os.path.abspath(s), index.root.resolve()) for s in shards]
            missing = set(names) - set(table.column("shard").to_pylist())
            if missing:
                raise ValueError(f"{where}: the index has no rows for shards {sorted(missing)}")
            table = table.filter(pc.is_in(table.column("shard"), value_set=pa.array(names)))
        self.index, self.table, self.name = index, table, name or where
        self.reader: RangeReader = reader if reader is not None else FileReader()
        self.keys = [str(k) for k in table.column("key").to_pylist()]
        self.labels = table.column("label").to_numpy().astype(np.int64)
        shard = table.column("shard").dictionary_encode().combine_chunks()  # (names in order of appearance)
        self._shard_names, self._shard_of = shard.dictionary.to_pylist(), shard.indices.to_numpy().astype(np.int64)
        cols = {m: member_column(m) for m in MEMBERS + EXTRA_MEMBERS}  # (a mask member in segmentation sets)
        self._spans = {m: (table.column(f"{c}_offset").to_numpy(), table.column(f"{c}_size").to_numpy())
                       for m, c in cols.items() if f"{c}_offset" in table.column_names}
        # member checksums (an index of an older build has none: its reads are not verified)
        self._crc = {m: table.column(f"{c}_{CHECKSUM}").to_numpy() for m, c in cols.items()
                     if f"{c}_{CHECKSUM}" in table.column_names}
        if not self._crc and len(table):
            _warn_once(where, f"{where}: the index has no {CHECKSUM} columns (an index from an older build): "
                              "samples are read without checksum verification; rebuild the index "
                              "(tools/make_shards.py, or tools/index_shards.py for plain webdataset tars) to verify them")
        self.image_size_setting = int(index.settings["image_size"]) if index.settings.get("image_size") else None
        self._wh = (table.column("width").to_numpy(), table.column("height").to_numpy())
        self.has_masks = MASK_MEMBER in self._spans and bool((self._spans[MASK_MEMBER][0] >= 0).all())
        # an index of plain webdataset shards (`apt_data.shards.inplace`): images other than .jpg, and
        # labels from a JSON field (no .cls member: the index's label is the label)
        self._image_ext = (table.column("image_ext").to_pylist() if "image_ext" in table.column_names else None)
        self._labels_in_index = index.settings.get("format") == INPLACE_FORMAT
        self._shard_paths = [f"{base.rstrip('/')}/{n}" if base is not None else str(index.root / n)
                             for n in self._shard_names]
        # each sample's whole span (all its members, from the tar header of the first, in whole blocks):
        # what one read fetches, and the key of the read-ahead and the cache
        present = [np.where(o >= 0, o, np.iinfo(np.int64).max) for o, _ in self._spans.values()]
        ends = [np.where(o >= 0, o + n, -1) for o, n in self._spans.values()]
        self._span_start = np.min(np.stack(present), axis=0) - BLOCK if present else np.zeros(len(table), np.int64)
        end = np.max(np.stack(ends), axis=0) if ends else self._span_start
        self._span_end = self._span_start + -(-(end - self._span_start) // BLOCK) * BLOCK

    def row(self, i: int) -> dict:
        """The index row of sample ``i`` (shard path relative to ``index.root``)."""
        return {c: v[0] for c, v in self.table.slice(int(i), 1).to_pydict().items()}

    def span(self, i: int) -> Span:
        """``(shard path or URL, start, end)``: the bytes one read of sample ``i`` fetches."""
        return self._shard_paths[int(self._shard_of[i])], int(self._span_start[i]), int(self._span_end[i])

    def _read(self, i: int, members: Sequence[str] = MEMBERS, parse_meta: bool = True) -> SampleRecord:
        spans = {m: (int(o[i]), int(n[i])) for m, (o, n) in self._spans.items() if o[i] >= 0}
        if set(members) <= spans.keys():  # (else every member there is is read: the check names what is missing)
            spans = {m: spans[m] for m in members}
        checksums = {m: int(self._crc[m][i]) for m in spans if m in self._crc}
        need_label = "cls" in members and ("cls" in spans or not self._labels_in_index)
        if self._image_ext is not None:  # shards indexed in place: .jpeg, .png, .webp images
            spans = image_ext_spans(spans, self._image_ext[i])
            checksums = image_ext_spans(checksums, self._image_ext[i])
        span = self.span(i)
        got: list[bytes] = []

        def fetch(offset: int, n: int) -> bytes:  # the reader asks within the sample's span: one read of it
            name, start, end = span
            if not start <= offset <= offset + n <= end:
                return self.reader.read(name, offset, offset + n)
            if not got:
                got.append(self.reader.read(name, start, end))
            return got[0][offset - start:offset - start + n]

        def check() -> SampleRecord:
            return read_record(fetch, span[0], self.keys[i], spans, strict=True, expect_label=int(self.labels[i]),
                               parse_meta=parse_meta, need_label=need_label, checksums=checksums)

        try:
            rec = check()
        except ShardDataError as e:
            # bytes from a copy (a cache) that fail the checks: the copy is dropped, read the store's
            if not got or not self.reader.rejected(span, f"{e.reason}: {e.detail}"):
                raise
            got.clear()
            rec = check()
        if got:
            self.reader.checked(span, got[0])
        return rec

    # -------------------------------------------------------------- reading ahead
    def read_order(self, ids: Sequence[int]) -> None:
        """The samples this process will read next, in order: a reader that reads ahead (remote
        shards) reads along it (the loader's workers call this with their bins or stream)."""
        if self.reader.reads_ahead:
            self.reader.read_order([self.span(i) for i in np.asarray(ids, np.int64).reshape(-1).tolist()])

    def prefetch(self, ids: Sequence[int]) -> None:
        """Start reading samples ``ids`` in the background (a reader that reads ahead; else nothing)."""
        self.reader.prefetch([self.span(i) for i in ids])

    def io_stats(self) -> dict:
        """The reader's counters over all processes (`apt_data.sources.readers.COUNTERS`: requests,
        retries, failed reads, bytes, merged reads, cache hits ...); empty for local files."""
        return self.reader.stats()

    def read(self, i: int) -> bytes:
        """The JPEG bytes of sample ``i``: one read of that member and its tar header."""
        return self._read(i, ("jpg",)).jpeg

    def read_with_mask(self, i: int) -> tuple[bytes, Optional[bytes]]:
        """``(jpeg, mask PNG bytes)`` of sample ``i``: one read of both members, each verified."""
        if not self.has_masks:
            return self.read(i), None
        rec = self._read(i, ("jpg", MASK_MEMBER), parse_meta=False)
        return rec.jpeg, rec.mask

    def read_record(self, i: int) -> tuple[bytes, SampleRecord]:
        """``(jpeg, SampleRecord)`` of sample ``i``: one read of all its members, checked against the index."""
        rec = self._read(i, tuple(self._spans))
        return rec.jpeg, rec

    def read_scores(self, i: int) -> tuple[bytes, Optional[np.ndarray]]:
        """`read_record` without parsing the JSON metadata: ``(jpeg, stored scores)``."""
        rec = self._read(i, parse_meta=False)
        return rec.jpeg, rec.scores

    def image_size(self, i: int) -> Optional[tuple[int, int]]:
        return int(self._wh[0][i]), int(self._wh[1][i])

    def stored_scores_usable(self, cfg: APTConfig, transform: ImageTransform) -> bool:
        """True when ``transform`` outputs the stored image unchanged and the stored score maps are
        for ``cfg``'s scorer, patch size and scales: layouts for any thresholds come from them."""
        st, ic = self.index.settings, self.index.config
        return (ic.scorer == cfg.scorer and ic.patch_size == cfg.patch_size and ic.num_scales == cfg.num_scales
                and transform.deterministic and transform.resize_scale is None and st.get("image_size") == transform.size
                and bool(st.get("crop", True)) == (not transform.keep_aspect) and transform.crop_pct == 1.0
                and (transform.keep_aspect is False or st.get("multiple", cfg.patch_size) == transform.multiple))

    def exact_token_counts(self, cfg: APTConfig, transform: ImageTransform) -> Optional[np.ndarray]:
        """Index token counts, when the index was made for this config and transform output."""
        if self.index.config != cfg or not self.stored_scores_usable(cfg, transform):
            return None
        return np.asarray(self.table.column("tokens").to_numpy(), np.int64)


def open_shards(source: str, split: Optional[str] = None) -> Optional[IndexSource]:
    """An `IndexSource` for ``shards/``, ``shards:val``, ``shards/train.parquet`` or ``shards/train-{0..3}.tar``;
    None when ``source`` is not shards."""
    if ":" in source and not os.path.exists(source) and "://" not in source:
        source, split = source.rsplit(":", 1)
    p = Path(source)
    if source.endswith(".parquet") or (p.is_dir() and any(p.glob("*.parquet"))):
        return IndexSource(read_index(p, split or "train"))
    if source.endswith(".tar") or "{" in source or "::" in source:
        urls = expand_urls(source)
        for idx in sorted(Path(urls[0]).parent.glob("*.parquet")):
            index = read_index(idx)
            want = {os.path.relpath(os.path.abspath(u), idx.parent.resolve()) for u in urls}
            if want <= set(index.table.column("shard").to_pylist()):
                return IndexSource(index, shards=urls)
        raise ValueError(f"{source}: no Parquet index beside these shards covers them; "
                         "write one with tools/make_shards.py (it plans batches and seeks samples)")
    return None
