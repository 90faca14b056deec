"""Loader sources backed by shards written by ``tools/make_shards.py`` (or any webdataset tars)."""
from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np

from .config import APTConfig
from .loader import Source
from .shards import MEMBERS, SampleRecord, ShardIndex, expand_urls, find_index, read_index, read_sample, split_scores
from .transforms import ImageTransform

# the .npy header make_shards writes (np.save of a 1-D little-endian float32 array, format 1.0)
_NPY_F4 = re.compile(rb"\x93NUMPY\x01\x00..\{'descr': '<f4', 'fortran_order': False, 'shape': \((\d+),\), \} *\n", re.S)
_BLOCK = 512


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
        # the fast read path: member spans as arrays, shard files by number, a few open descriptors
        shard_names = table.column("shard").to_pylist()
        self._shard_paths = list(dict.fromkeys(shard_names))
        number = {n: k for k, n in enumerate(self._shard_paths)}
        self._shard_of = np.array([number[n] for n in shard_names], np.int64)
        self._spans = {m: (table.column(f"{m}_offset").to_numpy(), table.column(f"{m}_size").to_numpy())
                       for m in MEMBERS if f"{m}_offset" in table.column_names}
        self._fds: OrderedDict = OrderedDict()

    def read(self, i: int) -> bytes:
        """The JPEG bytes of sample ``i``: one ``pread`` of the member and its tar header."""
        if "jpg" in self._spans:
            off, size = int(self._spans["jpg"][0][i]), int(self._spans["jpg"][1][i])
            if off >= _BLOCK and size > 0:
                span = self._pread(self._shard_of[i], off - _BLOCK, size + _BLOCK)
                if self._header_ok(span, 0, i, "jpg", size):
                    jpeg = span[_BLOCK:]
                    if jpeg.startswith(b"\xff\xd8\xff") and jpeg.endswith(b"\xff\xd9"):
                        return jpeg
        return self.read_record(i)[0]  # anything unusual: the full, validating reader says what

    def read_record(self, i: int):
        """``(jpeg, SampleRecord)`` of sample ``i``: one ``pread`` of all its members, each checked against
        the index (tar header name and size), then the checks of `apt_data.shards.read_sample`.
        Anything the fast path does not recognise goes through `read_sample`, which names the problem."""
        rec = self._read_fast(i)
        if rec is None:
            rec = read_sample(self._rows[i], self.index.root, strict=True)
        return rec.jpeg, rec

    def read_scores(self, i: int):
        """`read_record` without parsing the JSON metadata: ``(jpeg, stored scores)``."""
        rec = self._read_fast(i, meta=False)
        if rec is None:
            rec = read_sample(self._rows[i], self.index.root, strict=True)
        return rec.jpeg, rec.scores

    def _read_fast(self, i: int, meta: bool = True) -> Optional[SampleRecord]:
        spans = {m: (int(o[i]), int(n[i])) for m, (o, n) in self._spans.items() if int(o[i]) >= _BLOCK}
        if set(spans) != set(MEMBERS):
            return None
        start = min(o for o, _ in spans.values()) - _BLOCK
        end = max(o + n for o, n in spans.values())
        span = self._pread(self._shard_of[i], start, end - start)
        if len(span) != end - start:
            return None
        members = {}
        for m, (o, n) in spans.items():
            if not self._header_ok(span, o - _BLOCK - start, i, m, n):
                return None
            members[m] = span[o - start:o - start + n]
        jpeg = members["jpg"]
        if not (jpeg.startswith(b"\xff\xd8\xff") and jpeg.rstrip(b"\0").endswith(b"\xff\xd9")):
            return None
        try:
            label = int(members["cls"].decode("ascii").strip())
            meta = json.loads(members["json"]) if meta else {}
        except ValueError:
            return None
        m = _NPY_F4.match(members["npy"])
        if label != int(self.labels[i]) or not isinstance(meta, dict) or m is None:
            return None
        scores = np.frombuffer(members["npy"], np.float32, offset=m.end()).copy()  # writable, as np.load gives
        if scores.size != int(m.group(1)):
            return None
        if "scores" in meta:
            try:
                split_scores(scores, meta["scores"]["shapes"])
            except (ValueError, KeyError, TypeError):
                return None
        return SampleRecord(key=self.keys[i], jpeg=jpeg, label=label, meta=meta, scores=scores,
                            shard=str(self.index.root / self._shard_paths[self._shard_of[i]]))

    def _header_ok(self, span: bytes, at: int, i: int, member: str, size: int) -> bool:
        """Is the ustar header at ``span[at:]`` the one of ``<key>.<member>`` with ``size`` bytes?"""
        h = span[at:at + _BLOCK]
        name = f"{self.keys[i]}.{member}".encode()
        try:
            return (len(h) == _BLOCK and h[:100].rstrip(b"\0") == name and h[156:157] in (b"0", b"\0")
                    and int(h[124:136].rstrip(b" \0") or b"0", 8) == size)
        except ValueError:
            return False

    def _pread(self, shard: int, offset: int, n: int) -> bytes:
        """``n`` bytes at ``offset`` of a shard (descriptors cached, least recently used closed first;
        ``pread`` keeps no file position, so forked workers can share inherited descriptors)."""
        fd = self._fds.pop(shard, None)
        if fd is None:
            if len(self._fds) >= 32:
                os.close(self._fds.popitem(last=False)[1])
            fd = os.open(self.index.root / self._shard_paths[shard], os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._fds[shard] = fd
        data = os.pread(fd, n, offset)
        while len(data) < n:  # a short read: continue (or stop at the end of the file)
            more = os.pread(fd, n - len(data), offset + len(data))
            if not more:
                break
            data += more
        return data

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __getstate__(self):  # descriptors do not travel to other processes
        state = dict(self.__dict__)
        state["_fds"] = OrderedDict()
        return state

    def image_size(self, i: int) -> Optional[tuple[int, int]]:
        row = self._rows[i]
        return int(row["width"]), int(row["height"])

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
