"""The shard format: member names, format version, tar constants, and the validation of one sample.

A sample is ``<key>.cls`` (label), ``.jpg``, ``.json`` (metadata), ``.npy`` (flat float32 score
maps) and optionally ``.seg.png`` (mask), in that order (docs/shards.md). `record_from_members` is
the one check every reader applies.
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from crc32c import crc32c as member_checksum  # member_checksum(bytes) -> int in [0, 2**32)

from ..image import decode_image
from .errors import ShardStats, report_bad

__all__ = [
    "BLOCK", "CHECKSUM", "EXTRA_MEMBERS", "FORMAT_VERSION", "IMAGE_EXTS", "INDEX_METADATA_KEY", "INPLACE_FORMAT",
    "JPEG_EOI", "JPEG_SOI", "KEY_RE", "MASK_MEMBER", "MEMBERS", "TAR_MODE", "TAR_MTIME", "SampleRecord", "json_bytes",
    "load_scores", "member_column", "npy_bytes", "member_checksum", "record_from_members",
    "split_key", "split_scores",
]

#: Bumped when the meaning of a member or index column changes.
FORMAT_VERSION = 1
#: Members of one sample, in the order they are written (sorted by extension).
MEMBERS = ("cls", "jpg", "json", "npy")
#: The segmentation mask member (webdataset naming: ``<key>.seg.png``, decoded as a PNG by its last
#: extension): a single-channel PNG of class ids, the size of the sample's image.
MASK_MEMBER = "seg.png"
#: Members only some shard sets have: their index columns exist only in those sets' indexes.
EXTRA_MEMBERS = (MASK_MEMBER,)
#: Image member extensions of plain webdataset shards indexed in place (`apt_data.shards.inplace`);
#: their index keeps the image's span in the ``jpg_*`` columns and its extension in ``image_ext``.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
#: The ``format`` setting of an index of plain webdataset shards indexed in place.
INPLACE_FORMAT = "webdataset tar, indexed in place"
PNG_SIG = b"\x89PNG\r\n\x1a\n"
#: The member checksum of the index (column ``<member>_crc32c``): CRC32C, hardware-accelerated by the
#: ``crc32c`` package (about 20 GB/s, 0.5 us for a 10 KB JPEG), so every read can afford to verify it.
CHECKSUM = "crc32c"
#: Schema-metadata key of the Parquet index.
INDEX_METADATA_KEY = b"apt.shards"
#: Every tar member gets these, so the same samples give byte-identical shards.
TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z
TAR_MODE = 0o444
#: Sample keys a shard writer accepts (webdataset splits keys at the first dot).
KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,94}$")
#: The tar block size: headers and padded member data.
BLOCK = 512
#: JPEG start-of-image and end-of-image markers.
JPEG_SOI = b"\xff\xd8\xff"
JPEG_EOI = b"\xff\xd9"

# the .npy header a shard writer produces (np.save of a 1-D little-endian float32 array, format 1.0)
_NPY_F4 = re.compile(rb"\x93NUMPY\x01\x00..\{'descr': '<f4', 'fortran_order': False, 'shape': \((\d+),\), \} *\n", re.S)


@dataclass(frozen=True)
class SampleRecord:
    """One sample as stored: JPEG bytes, label, metadata and flat float32 ``scores`` (None: none stored;
    `score_maps` splits them by the shapes in ``meta``)."""

    key: str
    jpeg: bytes
    label: int
    meta: dict
    scores: Optional[np.ndarray]
    shard: str = ""
    mask: Optional[bytes] = None  # the .seg.png member (PNG bytes), in a segmentation set

    def score_maps(self) -> list[np.ndarray]:
        """Per-scale score maps (views into ``scores``), finest first, as `score_maps` returns."""
        if self.scores is None:
            raise ValueError(f"{self.shard}: sample {self.key!r} has no score maps")
        return split_scores(self.scores, self.meta["scores"]["shapes"])

    def image(self, size: Optional[int] = None, crop: bool = True) -> np.ndarray:
        """Decode the stored JPEG (`decode_image`); at its own size by default."""
        return decode_image(self.jpeg, size, crop=crop, name=f"{self.shard}:{self.key}")


def member_column(member: str) -> str:
    """The prefix of a member's index columns (``<prefix>_offset``, ...): ``seg`` for ``seg.png``."""
    return member.split(".", 1)[0]


def split_scores(flat: np.ndarray, shapes: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Split a flat score array (finest scale first, row-major) into per-scale maps."""
    sizes = [int(h) * int(w) for h, w in shapes]
    if flat.ndim != 1 or flat.size != sum(sizes):
        raise ValueError(f"score array of shape {flat.shape} does not hold maps of shapes {list(shapes)}")
    ends = np.cumsum(sizes)
    return [flat[e - n:e].reshape(int(h), int(w)) for (h, w), n, e in zip(shapes, sizes, ends)]


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` in ``np.save`` format, never pickled."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def json_bytes(obj: Any) -> bytes:
    """Compact, key-sorted ASCII JSON (so equal metadata gives equal bytes)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def load_scores(data: bytes) -> np.ndarray:
    """A .npy member as a writable 1-D float32 array (loaded without pickle); ValueError otherwise."""
    m = _NPY_F4.match(data)
    if m is not None and len(data) - m.end() == 4 * int(m.group(1)):  # the writer's header: no parsing
        return np.frombuffer(data, np.float32, offset=m.end()).copy()
    try:
        scores = np.load(io.BytesIO(data), allow_pickle=False)
    except EOFError as e:
        raise ValueError(f"truncated .npy ({e})") from None
    if scores.dtype != np.float32 or scores.ndim != 1:
        raise ValueError(f"expected 1-D float32, got {scores.dtype} {scores.shape}")
    return scores


def split_key(name: str) -> tuple[str, str]:
    """A member name as ``(key, extension)``: webdataset's rule, the key ends at the first dot of the file name."""
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def record_from_members(shard: str, key: str, members: Mapping[str, bytes], *, strict: bool,
                        stats: Optional[ShardStats], validate: bool = False, expect_label: Optional[int] = None,
                        parse_meta: bool = True, need_label: bool = True) -> Optional[SampleRecord]:
    """Check one sample's members and build its record (None for a bad sample when not ``strict``).

    Always: JPEG markers, an integer label (``expect_label``), a json object, a pickle-free 1-D float32
    .npy matching the json; ``validate`` decodes the JPEG. ``parse_meta=False``: ``meta`` is ``{}``;
    ``need_label=False``: without a .cls the label is ``expect_label``.
    """
    def bad(reason: str, detail: str) -> None:
        return report_bad(shard, key, reason, detail, strict, stats)

    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is None:
        return bad("missing_image", f"members: {sorted(members)}")
    jpeg = members[ext]
    problem = _image_problem(ext, jpeg)
    if problem is not None:
        return bad(*problem)
    label, problem = _label_of(members, expect_label, need_label)
    if problem is not None:
        return bad(*problem)
    meta: dict = {}
    if parse_meta and "json" in members:
        try:
            meta = json.loads(members["json"])
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            return bad("bad_json", str(e)[:200])
    scores = None
    if "npy" in members:
        try:
            scores = load_scores(members["npy"])
            if "scores" in meta:
                split_scores(scores, meta["scores"]["shapes"])
        except (ValueError, KeyError, TypeError) as e:
            return bad("bad_scores", str(e)[:200])
    mask = members.get(MASK_MEMBER)
    if mask is not None and not (mask.startswith(PNG_SIG) and b"IEND" in mask[-16:]):
        return bad("corrupt_mask", f".{MASK_MEMBER} member is not a complete PNG (starts {mask[:8]!r})")
    if validate:
        problem = _decoded_problem(f"{shard}:{key}", jpeg, mask)
        if problem is not None:
            return bad(*problem)
    if stats is not None:
        stats.samples += 1
    return SampleRecord(key=key, jpeg=jpeg, label=label, meta=meta, scores=scores, shard=str(shard), mask=mask)


def _image_problem(ext: str, data: bytes) -> Optional[tuple[str, str]]:
    """``(reason, detail)`` when an image member is empty or not a complete file of its type, else None."""
    if len(data) == 0:
        return "empty_image", f"0-byte .{ext} member"
    if ext == "png":  # only in shards indexed in place
        if not data.startswith(PNG_SIG):
            return "not_png", f".png member starts with {data[:8]!r}"
        if b"IEND" not in data[-16:]:
            return "corrupt_png", "no IEND chunk (truncated PNG)"
    elif ext == "webp":
        if not (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            return "not_webp", f".webp member starts with {data[:12]!r}"
        if len(data) < int.from_bytes(data[4:8], "little") + 8:
            return "corrupt_webp", "shorter than its RIFF size (truncated WebP)"
    else:
        if not data.startswith(JPEG_SOI):
            return "not_jpeg", f".{ext} member starts with {data[:8]!r}"
        if not data.rstrip(b"\0").endswith(JPEG_EOI):
            return "corrupt_jpeg", "no end-of-image marker (truncated JPEG)"
    return None


def _label_of(members: Mapping[str, bytes], expect_label: Optional[int],
              need_label: bool) -> tuple[int, Optional[tuple[str, str]]]:
    """``(label, None)``, or ``(-1, (reason, detail))`` when the .cls member is bad or missing."""
    if "cls" not in members:
        if need_label or expect_label is None:
            return -1, ("missing_label", f"no .cls member; members: {sorted(members)}")
        return int(expect_label), None
    try:
        label = int(members["cls"].decode("ascii").strip())
        if label < 0:
            raise ValueError("negative")
    except ValueError:
        return -1, ("bad_label", f".cls member is {members['cls'][:20]!r}")
    if expect_label is not None and label != expect_label:
        return -1, ("index_mismatch", f".cls {label} != index label {expect_label}")
    return label, None


def _decoded_problem(name: str, jpeg: bytes, mask: Optional[bytes]) -> Optional[tuple[str, str]]:
    """``(reason, detail)`` when the image does not decode, or its mask does not decode to its size."""
    try:
        image = decode_image(jpeg, name=name)
    except ValueError as e:
        return "corrupt_jpeg", str(e)[:200]
    if mask is not None:
        from ..masks import check_mask, decode_mask

        try:
            check_mask(decode_mask(mask, f"{name}.{MASK_MEMBER}"), image.shape, f"{name}.{MASK_MEMBER}")
        except ValueError as e:
            return "corrupt_mask", str(e)[:200]
    return None
