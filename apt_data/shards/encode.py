"""Encoding one source image for a shard: resized, stored as JPEG, with its score maps and token counts."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np

from ..config import APTConfig
from ..image import decode_image
from ..layout import patchify
from ..scoring import score_maps
from .format import JPEG_EOI

PathLike = Union[str, os.PathLike]

__all__ = ["EncodedSample", "SourceError", "encode_sample", "encode_sample_mask", "sample_meta"]


class SourceError(ValueError):
    """A source image that cannot be stored; ``reason`` is one of empty_file, not_an_image,
    corrupt_image, unreadable_file, bad_mask (its mask unreadable or not of its size)."""

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
                  name: Optional[str] = None, exif_transpose: bool = False) -> EncodedSample:
    """Resize a source image for storage (`decode_image`) and compute its score maps and token counts.

    Re-encoded as JPEG (``quality``, 4:2:0, optimised) unless it already is a JPEG of the stored size
    (kept: no second generation loss). Scores come from the decoded stored bytes, as a loader would
    compute them. Unreadable sources raise `SourceError` with a reason.
    """
    from PIL import Image, UnidentifiedImageError

    label = name or (os.fspath(source) if not isinstance(source, (bytes, bytearray)) else f"<{len(source)} bytes>")
    multiple = multiple or cfg.patch_size
    try:
        raw = bytes(source) if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
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
        resized = decode_image(raw, image_size, crop=crop, multiple=multiple, name=label,
                               exif_transpose=exif_transpose)
        jpeg, reencoded = raw, True
        if fmt == "JPEG" and resized.shape[:2] == orig_size[::-1] and raw.rstrip(b"\0").endswith(JPEG_EOI):
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


def encode_sample_mask(mask: Union[PathLike, bytes], enc: EncodedSample, labels: Optional[Any] = None,
                       name: str = "") -> bytes:
    """The stored mask: ids mapped by ``labels``, checked against the source image's size, resized
    nearest to the stored size and encoded as PNG; else `SourceError` ``bad_mask`` naming it."""
    from ..masks import check_mask, decode_mask, encode_mask
    from ..transforms import resample_pair

    label = name or (os.fspath(mask) if not isinstance(mask, (bytes, bytearray)) else "mask")
    try:
        m = check_mask(decode_mask(mask, label, labels), enc.orig_size[::-1], label)
    except (ValueError, OSError) as e:
        raise SourceError(label, "bad_mask", str(e)) from None
    h, w = enc.image.shape[:2]
    m = resample_pair(m, None, (0, 0, m.shape[1], m.shape[0]), (w, h), False, nearest=True)[0]
    return encode_mask(m)


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
