"""Webdataset-compatible tar shards with precomputed APT score maps, and a Parquet index.

A shard is a plain tar that `webdataset.WebDataset` reads as is: each sample is the members
``<key>.cls`` (ASCII integer label), ``<key>.jpg`` (JPEG bytes), ``<key>.json`` (metadata) and
``<key>.npy`` (float32 score maps of every scale, flattened finest scale first and concatenated;
shapes in the json), written in that order. The index (``<prefix>.parquet``) has one row per
sample with its label, sizes, token counts and the byte offset and size of every member, so a
loader can plan batches and per-rank work without opening a shard and then read any sample with
one seek. Nothing is ever pickled: .npy members are written and read with ``allow_pickle=False``
and all metadata is JSON. Shards and index are written atomically (``.tmp``, fsync, rename).
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from .config import APTConfig
from .image import decode_image
from .layout import patchify
from .scoring import score_maps

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: Bumped when the meaning of a member or index column changes.
FORMAT_VERSION = 1
#: Members of one sample, in the order they are written (sorted by extension).
MEMBERS = ("cls", "jpg", "json", "npy")
#: Schema-metadata key of the Parquet index.
INDEX_METADATA_KEY = b"apt.shards"
#: Image files listed by `list_image_folder` (torchvision's ImageFolder extensions).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: Every tar member gets these, so the same samples give byte-identical shards.
TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z
TAR_MODE = 0o444
KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,94}$")

_BLOCK = 512
_SOI = b"\xff\xd8\xff"
_EOI = b"\xff\xd9"


# --------------------------------------------------------------------------------------------
# Bad data: one error type, one counter
# --------------------------------------------------------------------------------------------

class ShardDataError(ValueError):
    """Bad data in a shard or source (``strict=True``): names the shard (or file) and the key."""

    def __init__(self, shard: str, key: Optional[str], reason: str, detail: str = ""):
        self.shard, self.key, self.reason, self.detail = shard, key, reason, detail
        super().__init__(f"{shard}: sample {key!r}: {reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):  # survives a multiprocessing round trip
        return (self.__class__, (self.shard, self.key, self.reason, self.detail))


@dataclass(frozen=True)
class Skipped:
    """One sample left out: where, which, why."""

    shard: str
    key: Optional[str]
    reason: str
    detail: str = ""


@dataclass
class ShardStats:
    """What a non-strict reader (or make_shards) kept and left out; pass one in to read it after.

    ``skipped`` counts the left-out samples by reason (``stats.skipped["corrupt_jpeg"]``);
    ``events`` has one `Skipped` per sample, naming shard and key.
    """

    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    events: list = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, shard: str, key: Optional[str], reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        self.events.append(Skipped(str(shard), key, reason, detail))

    def summary(self) -> str:
        """One line: ``kept N, skipped M (reason=count, ...)``."""
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(self.skipped.items()))
        return f"kept {self.samples}, skipped {self.num_skipped}" + (f" ({reasons})" if reasons else "")


def _bad(shard: str, key: Optional[str], reason: str, detail: str, strict: bool,
         stats: Optional[ShardStats]) -> None:
    """Raise (strict) or log + count one bad sample; the single place that decides."""
    if strict:
        raise ShardDataError(str(shard), key, reason, detail)
    where = f"sample {key!r} in {shard}" if key is not None else f"the rest of {shard}"
    log.warning("skipping %s: %s%s", where, reason, f" ({detail})" if detail else "")
    if stats is not None:
        stats.skip(str(shard), key, reason, detail)


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SampleRecord:
    """One sample as stored: JPEG bytes (decoded later, in the loader), label, metadata, scores.

    ``scores`` is the flat float32 array of the .npy member (None when the shard has none);
    `score_maps` splits it into one map per scale using the shapes in ``meta``.
    """

    key: str
    jpeg: bytes
    label: int
    meta: dict
    scores: Optional[np.ndarray]
    shard: str = ""

    def score_maps(self) -> list[np.ndarray]:
        """Per-scale score maps (views into ``scores``), finest first, as `score_maps` returns."""
        if self.scores is None:
            raise ValueError(f"{self.shard}: sample {self.key!r} has no score maps")
        return split_scores(self.scores, self.meta["scores"]["shapes"])

    def image(self, size: Optional[int] = None, crop: bool = True) -> np.ndarray:
        """Decode the stored JPEG (`decode_image`); at its own size by default."""
        return decode_image(self.jpeg, size, crop=crop, name=f"{self.shard}:{self.key}")


def split_scores(flat: np.ndarray, shapes: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Split a flat score array (finest scale first, row-major) into per-scale maps."""
    sizes = [int(h) * int(w) for h, w in shapes]
    if flat.ndim != 1 or flat.size != sum(sizes):
        raise ValueError(f"score array of shape {flat.shape} does not hold maps of shapes {list(shapes)}")
    ends = np.cumsum(sizes)
    return [flat[e - n:e].reshape(int(h), int(w)) for (h, w), n, e in zip(shapes, sizes, ends)]


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _record_from_members(shard: str, key: str, members: Mapping[str, bytes], *, strict: bool,
                         stats: Optional[ShardStats], validate: bool,
                         expect_label: Optional[int] = None) -> Optional[SampleRecord]:
    """Check one sample's members and build its record; the one validation both readers use.

    Cheap checks always (members present and non-empty, JPEG start/end markers, integer label,
    JSON object, float32 .npy loaded without pickle, sizes consistent with the json); with
    ``validate`` the JPEG is also decoded.
    """
    jpeg = members.get("jpg", members.get("jpeg"))
    if jpeg is None:
        return _bad(shard, key, "missing_image", f"members: {sorted(members)}", strict, stats)
    if len(jpeg) == 0:
        return _bad(shard, key, "empty_image", "0-byte .jpg member", strict, stats)
    if not jpeg.startswith(_SOI):
        return _bad(shard, key, "not_jpeg", f".jpg member starts with {jpeg[:8]!r}", strict, stats)
    if not jpeg.rstrip(b"\0").endswith(_EOI):
        return _bad(shard, key, "corrupt_jpeg", "no end-of-image marker (truncated JPEG)", strict, stats)
    if "cls" not in members:
        return _bad(shard, key, "missing_label", f"no .cls member; members: {sorted(members)}", strict, stats)
    try:
        label = int(members["cls"].decode("ascii").strip())
        if label < 0:
            raise ValueError("negative")
    except ValueError:
        return _bad(shard, key, "bad_label", f".cls member is {members['cls'][:20]!r}", strict, stats)
    if expect_label is not None and label != expect_label:
        return _bad(shard, key, "index_mismatch", f".cls {label} != index label {expect_label}", strict, stats)
    meta: dict = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            return _bad(shard, key, "bad_json", str(e)[:200], strict, stats)
    scores = None
    if "npy" in members:
        try:
            scores = np.load(io.BytesIO(members["npy"]), allow_pickle=False)
            if scores.dtype != np.float32 or scores.ndim != 1:
                raise ValueError(f"expected 1-D float32, got {scores.dtype} {scores.shape}")
            if "scores" in meta:
                split_scores(scores, meta["scores"]["shapes"])
        except (ValueError, KeyError, TypeError, EOFError) as e:
            return _bad(shard, key, "bad_scores", str(e)[:200], strict, stats)
    if validate:
        try:
            decode_image(jpeg, name=f"{shard}:{key}")
        except ValueError as e:
            return _bad(shard, key, "corrupt_jpeg", str(e)[:200], strict, stats)
    if stats is not None:
        stats.samples += 1
    return SampleRecord(key=key, jpeg=jpeg, label=label, meta=meta, scores=scores, shard=str(shard))


# --------------------------------------------------------------------------------------------
# Tar reading: a small sequential ustar reader that notices truncation (tarfile stops silently)
# --------------------------------------------------------------------------------------------

class _TarTruncated(Exception):
    pass


class _TarCorrupt(Exception):
    pass


def _read_exact(f: BinaryIO, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        b = f.read(n - got)
        if not b:
            break
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def _scan_tar(f: BinaryIO, start: int = 0, until_eof_ok: bool = False) -> Iterator[tuple[str, int, bytes]]:
    """Yield ``(name, data_offset, data)`` for each regular file of a tar stream, in order.

    Raises `_TarTruncated` (with the member name, if its header was read) when the stream ends
    before the end-of-archive blocks, `_TarCorrupt` on a header with a bad checksum. PAX ``path``
    records and GNU long names are honoured; directories and other entries are skipped.
    ``until_eof_ok``: a clean end at a header boundary is fine (reading a span of a shard).
    """
    pos = start
    long_name: Optional[str] = None
    while True:
        header = _read_exact(f, _BLOCK)
        if len(header) == 0 and until_eof_ok:
            return
        if len(header) < _BLOCK:
            raise _TarTruncated(None)
        if header == b"\0" * _BLOCK:
            return  # end-of-archive marker
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise _TarCorrupt(f"bad tar header at byte {pos}: {e}") from None
        name = long_name or info.name
        long_name = None
        pos += _BLOCK
        padded = -(-info.size // _BLOCK) * _BLOCK
        data = _read_exact(f, padded)
        if len(data) < info.size:
            raise _TarTruncated(name)
        data = data[:info.size]
        if info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif info.type == tarfile.XHDTYPE:
            for m in re.finditer(rb"(\d+) ([^=]+)=", data):
                if m.group(2) == b"path":
                    value = data[m.end():m.start() + int(m.group(1)) - 1]
                    long_name = value.decode("utf-8", "surrogateescape")
        elif info.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
            yield name, pos, data
        pos += padded


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name."""
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def _open_url(url: PathLike) -> BinaryIO:
    s = os.fspath(url)
    if re.match(r"^[a-z][a-z0-9+.-]*:", s) and not os.path.exists(s):
        from webdataset import gopen  # pipe:, http(s):, ... as webdataset opens them
        return gopen(s, "rb")
    return open(s, "rb")


def iter_shard(path: PathLike, *, strict: bool = False, stats: Optional[ShardStats] = None,
               validate: bool = False) -> Iterator[SampleRecord]:
    """Stream the samples of one shard in order, without an index (a path or a webdataset URL).

    Bad samples and a truncated or corrupt tar are logged, counted in ``stats`` and skipped
    (``strict=False``: what comes before them is still yielded) or raise `ShardDataError`
    naming the shard and key (``strict=True``).
    """
    shard = os.fspath(path)
    try:
        f = _open_url(path)
    except OSError as e:
        _bad(shard, None, "unreadable_shard", str(e), strict, stats)
        return
    key: Optional[str] = None
    members: dict[str, bytes] = {}
    with f:
        try:
            for name, _, data in _scan_tar(f):
                k, ext = _split_key(name)
                if k != key and key is not None:
                    rec = _record_from_members(shard, key, members, strict=strict, stats=stats, validate=validate)
                    members = {}
                    if rec is not None:
                        yield rec
                key = k
                members[ext] = data
        except _TarTruncated as e:
            culprit = _split_key(e.args[0])[0] if e.args[0] else key
            if key is not None and culprit != key:  # the cut is in the next sample's first member
                rec = _record_from_members(shard, key, members, strict=strict, stats=stats, validate=validate)
                if rec is not None:
                    yield rec
            _bad(shard, culprit, "truncated_tar",
                 "shard ends inside this sample" if e.args[0] else "shard ends after a member of this sample "
                 "without an end-of-archive marker; the sample may be incomplete", strict, stats)
            return
        except _TarCorrupt as e:
            _bad(shard, key, "corrupt_tar", f"{e}; the rest of the shard is skipped", strict, stats)
            return
        except OSError as e:
            _bad(shard, key, "unreadable_shard", str(e), strict, stats)
            return
    if key is not None:
        rec = _record_from_members(shard, key, members, strict=strict, stats=stats, validate=validate)
        if rec is not None:
            yield rec


def expand_urls(urls: Union[PathLike, Sequence[PathLike]]) -> list[str]:
    """Expand webdataset brace notation (``train-{000000..000003}.tar``) and ``::`` lists."""
    from braceexpand import braceexpand  # a webdataset dependency

    if isinstance(urls, (str, os.PathLike)):
        urls = os.fspath(urls).split("::")
    return [u for spec in urls for u in braceexpand(os.fspath(spec))]


def iter_shards(urls: Union[PathLike, Sequence[PathLike]], *, strict: bool = False,
                stats: Optional[ShardStats] = None, validate: bool = False) -> Iterator[SampleRecord]:
    """`iter_shard` over a list of shards or a brace pattern; a bad shard does not stop the rest."""
    for url in expand_urls(urls):
        yield from iter_shard(url, strict=strict, stats=stats, validate=validate)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def fsync_dir(path: PathLike) -> None:
    """Make a rename in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on ``PATH.tmp``, fsync it, rename it to ``path``: readers see the old file
    or the complete new one, never a partial one; a failed write leaves neither ``.tmp`` nor a change.
    The project's one atomic writer (shards, index, checkpoints, metrics, reports)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """`atomic_write` of ``data``."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


class ShardWriter:
    """Write one shard: members go to ``NAME.tmp``; `commit` fsyncs and renames it to ``NAME``.

    A crash before `commit` leaves only the ``.tmp`` file, never a partial ``NAME``. Members get
    fixed mtime/uid/gid/mode and samples keep the order given, so equal input gives equal bytes.
    Use as a context manager (commit on success, remove the ``.tmp`` on an exception).
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self._file = open(self.tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.keys: list[str] = []

    def write(self, key: str, members: Mapping[str, bytes]) -> dict[str, tuple[int, int]]:
        """Add one sample's members (extension -> bytes) in sorted order -> {ext: (offset, size)}."""
        if not KEY_RE.match(key):
            raise ValueError(f"{self.path}: invalid sample key {key!r} (letters, digits, '_' and '-' only, <= 95 chars)")
        offsets = {}
        for ext in sorted(members):
            data = bytes(members[ext])
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), TAR_MTIME, TAR_MODE
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            start = self._tar.offset
            self._tar.addfile(info, io.BytesIO(data))
            assert self._tar.offset == start + _BLOCK + -(-len(data) // _BLOCK) * _BLOCK
            offsets[ext] = (start + _BLOCK, len(data))
        self.keys.append(key)
        return offsets

    def write_sample(self, key: str, jpeg: bytes, label: int, meta: Mapping[str, Any],
                     scores: Optional[np.ndarray]) -> dict[str, tuple[int, int]]:
        """Add a sample in the standard members (.cls, .jpg, .json, .npy)."""
        members = {"cls": str(int(label)).encode("ascii"), "jpg": jpeg, "json": _json_bytes(dict(meta))}
        if scores is not None:
            scores = np.asarray(scores)
            if scores.dtype != np.float32 or scores.ndim != 1:
                raise ValueError(f"{self.path}: scores of {key!r} must be a flat float32 array, got {scores.dtype} {scores.shape}")
            members["npy"] = _npy_bytes(scores)
        return self.write(key, members)

    def commit(self) -> int:
        """Finish the tar, fsync, rename into place; returns the shard's size in bytes."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return self.path.stat().st_size

    def abort(self) -> None:
        """Drop the shard: close and remove the ``.tmp`` file."""
        try:
            self._tar.close()
        except Exception:
            pass
        self._file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


# --------------------------------------------------------------------------------------------
# Encoding one source image
# --------------------------------------------------------------------------------------------

class SourceError(ValueError):
    """A source image that cannot be stored; ``reason`` is one of empty_file, not_an_image,
    corrupt_image, unreadable_file."""

    def __init__(self, source: str, reason: str, detail: str):
        self.source, self.reason, self.detail = source, reason, detail
        super().__init__(f"{source}: {reason} ({detail})")

    def __reduce__(self):
        return (self.__class__, (self.source, self.reason, self.detail))


@dataclass(frozen=True)
class EncodedSample:
    """A source image as it will be stored, with what was computed from the stored pixels."""

    jpeg: bytes
    image: np.ndarray            # the stored JPEG decoded: exactly what a loader will see
    scores: np.ndarray           # flat float32, finest scale first
    score_shapes: list[tuple[int, int]]
    tokens: np.ndarray           # int64 [num_scales], patchify(image, cfg).counts()
    orig_size: tuple[int, int]   # (width, height) of the source
    reencoded: bool


def encode_sample(source: Union[PathLike, bytes], cfg: APTConfig, image_size: Optional[int], *,
                  crop: bool = True, multiple: Optional[int] = None, quality: int = 95,
                  name: Optional[str] = None) -> EncodedSample:
    """Resize a source image for storage and compute its score maps and token counts.

    The image is resized with `decode_image` (``size=image_size``, ``crop``) and re-encoded as
    JPEG (``quality``, 4:2:0, optimised Huffman tables), unless the source already is a JPEG at
    exactly the stored size, whose bytes are then kept (no second generation loss). Scores and
    counts are computed on the *decoded stored bytes*, so they equal what a loader recomputes.
    Raises `SourceError` (a ValueError) with a reason for unreadable sources.
    """
    from PIL import Image, UnidentifiedImageError

    label = name or (os.fspath(source) if not isinstance(source, (bytes, bytearray)) else f"<{len(source)} bytes>")
    multiple = multiple or cfg.patch_size
    if isinstance(source, (bytes, bytearray)):
        raw = bytes(source)
    else:
        try:
            with open(source, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise SourceError(label, "unreadable_file", str(e)) from None
    if not raw:
        raise SourceError(label, "empty_file", "0 bytes")
    try:
        with Image.open(io.BytesIO(raw)) as im:
            fmt, orig_size = im.format, im.size
    except UnidentifiedImageError:
        raise SourceError(label, "not_an_image", "PIL cannot identify it") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise SourceError(label, "corrupt_image", str(e)) from None
    try:
        resized = decode_image(raw, image_size, crop=crop, multiple=multiple, name=label)
        jpeg, reencoded = raw, True
        if fmt == "JPEG" and resized.shape[:2] == orig_size[::-1] and raw.rstrip(b"\0").endswith(_EOI):
            stored = decode_image(raw, name=label)
            reencoded = not np.array_equal(stored, resized)
        if reencoded:
            buf = io.BytesIO()
            Image.fromarray(resized).save(buf, "JPEG", quality=quality, subsampling=2, optimize=True)
            jpeg = buf.getvalue()
            stored = decode_image(jpeg, name=label)
    except (ValueError, Image.DecompressionBombError) as e:
        raise SourceError(label, "corrupt_image", str(e)) from None
    maps = score_maps(stored, cfg.patch_size, cfg.num_scales, cfg.scorer)
    return EncodedSample(
        jpeg=jpeg, image=stored, scores=np.concatenate([m.ravel() for m in maps]),
        score_shapes=[tuple(int(v) for v in m.shape) for m in maps],
        tokens=patchify(stored, cfg).counts(), orig_size=(int(orig_size[0]), int(orig_size[1])),
        reencoded=reencoded)


def config_dict(cfg: APTConfig) -> dict:
    """The JSON form of an APTConfig stored in the index metadata (and read back by `read_index`)."""
    return {"patch_size": cfg.patch_size, "num_scales": cfg.num_scales,
            "thresholds": list(cfg.thresholds), "scorer": cfg.scorer}


def sample_meta(key: str, enc: EncodedSample, cfg: APTConfig, *, label: int, source: str, crop: bool,
                quality: int, extra: Optional[Mapping[str, Any]] = None) -> dict:
    """The .json member of a sample (see docs/shards.md for every field)."""
    h, w = enc.image.shape[:2]
    meta = {
        "key": key, "label": int(label), "source": source,
        "orig_width": enc.orig_size[0], "orig_height": enc.orig_size[1], "width": int(w), "height": int(h),
        "crop": bool(crop), "reencoded": bool(enc.reencoded), "jpeg_quality": int(quality) if enc.reencoded else None,
        "scores": {"scorer": cfg.scorer, "patch_size": cfg.patch_size, "num_scales": cfg.num_scales,
                   "shapes": [list(s) for s in enc.score_shapes], "dtype": "float32",
                   "layout": "flat, finest scale first, each map row-major"},
        "thresholds": list(cfg.thresholds), "tokens": [int(t) for t in enc.tokens],
    }
    meta.update(extra or {})
    return meta


# --------------------------------------------------------------------------------------------
# Index
# --------------------------------------------------------------------------------------------

def index_columns(num_scales: int) -> list[str]:
    """Index columns in order (see docs/shards.md)."""
    return (["key", "shard", "label", "source", "orig_width", "orig_height", "width", "height"]
            + [f"tokens_s{s}" for s in range(num_scales)] + ["tokens"]
            + [f"{m}_{what}" for m in MEMBERS for what in ("offset", "size")])


def index_row(key: str, shard: str, meta: Mapping[str, Any], offsets: Mapping[str, tuple[int, int]]) -> dict:
    """One index row from a sample's metadata and its member offsets (``-1`` for a missing member)."""
    row = {"key": key, "shard": shard, "label": int(meta["label"]), "source": str(meta.get("source", "")),
           "orig_width": int(meta["orig_width"]), "orig_height": int(meta["orig_height"]),
           "width": int(meta["width"]), "height": int(meta["height"])}
    for s, t in enumerate(meta["tokens"]):
        row[f"tokens_s{s}"] = int(t)
    row["tokens"] = int(sum(meta["tokens"]))
    for m in MEMBERS:
        off, size = offsets.get(m, (-1, -1))
        row[f"{m}_offset"], row[f"{m}_size"] = int(off), int(size)
    return row


def index_table(rows: Sequence[Mapping[str, Any]], num_scales: int):
    """Index rows (`index_row` dicts) as a pyarrow Table with the index column types."""
    import pyarrow as pa

    types = {"key": pa.string(), "shard": pa.string(), "source": pa.string(), "label": pa.int64()}
    return pa.table({c: pa.array([r[c] for r in rows], type=types.get(
        c, pa.int64() if c.endswith(("_offset", "_size")) else pa.int32())) for c in index_columns(num_scales)})


def write_index(path: PathLike, rows: Union[Sequence[Mapping[str, Any]], Any], cfg: APTConfig,
                settings: Mapping[str, Any]) -> None:
    """Write the Parquet index atomically (``rows``: `index_row` dicts or an `index_table`);
    the APTConfig and ``settings`` go in the schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = rows if isinstance(rows, pa.Table) else index_table(rows, cfg.num_scales)
    meta = {"format_version": FORMAT_VERSION, "config": config_dict(cfg), **settings}
    table = table.replace_schema_metadata({INDEX_METADATA_KEY: _json_bytes(meta)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


@dataclass(frozen=True)
class ShardIndex:
    """A shard set's index: the Parquet table, the APTConfig its token counts are for, settings.

    ``settings`` holds image_size, crop, multiple, jpeg_quality, prefix, num_shards, classes, ...
    Shard paths in the table are relative to ``root`` (the index's directory).
    """

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
    """Read an index written by make_shards: a ``<prefix>.parquet`` file, or a shard folder and
    the split (prefix) to read from it."""
    import pyarrow.parquet as pq

    path = find_index(path, split)
    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(INDEX_METADATA_KEY)
    if raw is None:
        raise ValueError(f"{path}: not an apt shard index (no {INDEX_METADATA_KEY.decode()} schema metadata)")
    meta = json.loads(raw)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: index format version {meta.get('format_version')}, this code reads {FORMAT_VERSION}")
    cfg = APTConfig(**meta.pop("config"))
    return ShardIndex(table=table, config=cfg, settings=meta, root=path.parent)


def read_sample(row: Mapping[str, Any], root: Optional[PathLike] = None, *, strict: bool = False,
                stats: Optional[ShardStats] = None, validate: bool = False) -> Optional[SampleRecord]:
    """Read one sample with a single seek + read, from an index row (or any mapping with ``shard``,
    ``key`` and ``<member>_offset`` / ``<member>_size``); no tar scan.

    The read span is parsed as tar members, so a shard rewritten since the index was made
    (other names, offsets or label) is reported as ``index_mismatch`` rather than misread.
    Returns None for a bad sample when ``strict=False`` (logged and counted in ``stats``).
    """
    shard = Path(os.fspath(row["shard"]))
    if root is not None and not shard.is_absolute():
        shard = Path(root) / shard
    key = str(row["key"])
    spans = {m: (int(row[f"{m}_offset"]), int(row[f"{m}_size"])) for m in MEMBERS
             if f"{m}_offset" in row and int(row[f"{m}_offset"]) >= 0}
    if not spans:
        return _bad(str(shard), key, "index_mismatch", "row has no member offsets", strict, stats)
    start = min(o for o, _ in spans.values()) - _BLOCK
    end = max(o + s for o, s in spans.values())
    length = -(-(end - start) // _BLOCK) * _BLOCK
    try:
        with open(shard, "rb") as f:
            f.seek(start)
            span = _read_exact(f, length)
    except OSError as e:
        return _bad(str(shard), key, "unreadable_shard", str(e), strict, stats)
    if len(span) < end - start:
        return _bad(str(shard), key, "truncated_tar", f"shard has {start + len(span)} bytes, sample ends at {end}",
                    strict, stats)
    span += b"\0" * (length - len(span))  # pad a last member cut exactly at its data end
    members: dict[str, bytes] = {}
    try:
        for name, off, data in _scan_tar(io.BytesIO(span), start, until_eof_ok=True):
            k, ext = _split_key(name)
            if k != key or spans.get(ext, (None,))[0] != off:
                raise _TarCorrupt(f"found {name!r} at byte {off}")
            members[ext] = data
    except (_TarCorrupt, _TarTruncated) as e:
        return _bad(str(shard), key, "index_mismatch", f"the shard does not match the index: {e}", strict, stats)
    if set(members) != set(spans):
        return _bad(str(shard), key, "index_mismatch", f"members {sorted(members)} != index {sorted(spans)}", strict, stats)
    return _record_from_members(str(shard), key, members, strict=strict, stats=stats, validate=validate,
                                expect_label=int(row["label"]) if "label" in row else None)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

def list_image_folder(root: PathLike) -> list[tuple[Path, int, str]]:
    """``(path, label, class_name)`` for every image of an ImageNet-layout folder.

    One sub-folder per class; classes sorted by name give labels 0..C-1 (torchvision's
    ImageFolder order, which for wnid folders is also ImageNet-1k's label order); images are
    found recursively by extension (`IMAGE_EXTENSIONS`), sorted. Hidden entries are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class sub-folders (expected ImageNet layout root/<class>/<image>)")
    out = []
    for label, cls in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / cls):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                if not fn.startswith(".") and fn.lower().endswith(IMAGE_EXTENSIONS):
                    out.append((Path(dirpath) / fn, label, cls))
    out.sort(key=lambda t: (t[1], str(t[0])))
    if not out:
        raise ValueError(f"{root}: no images with extensions {IMAGE_EXTENSIONS}")
    return out


def read_file_list(path: PathLike) -> list[tuple[Path, int, str]]:
    """``(path, label, class_name)`` from a text/TSV list: ``path<TAB>label[<TAB>class_name]``.

    Relative paths are relative to the list's directory; blank lines and ``#`` comments are
    skipped; a missing class name becomes the label as text.
    """
    path = Path(path)
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) < 2:
            parts = line.split()
        try:
            label = int(parts[1])
            if label < 0:
                raise ValueError
        except (IndexError, ValueError):
            raise ValueError(f"{path}:{n}: expected 'path<TAB>label[<TAB>class]', got {line!r}") from None
        p = Path(parts[0])
        out.append((p if p.is_absolute() else path.parent / p, label, parts[2] if len(parts) > 2 else str(label)))
    if not out:
        raise ValueError(f"{path}: empty file list")
    return out


__all__ = [
    "EncodedSample", "FORMAT_VERSION", "IMAGE_EXTENSIONS", "MEMBERS", "SampleRecord", "ShardDataError",
    "ShardIndex", "ShardStats", "ShardWriter", "Skipped", "SourceError", "atomic_write", "atomic_write_bytes", "fsync_dir", "config_dict",
    "encode_sample", "expand_urls", "find_index", "index_columns", "index_table", "index_row", "iter_shard", "iter_shards",
    "list_image_folder", "read_file_list", "read_index", "read_sample", "sample_meta", "split_scores",
    "write_index",
]
