"""Segmentation masks: decoding and checking one mask, its class-id mapping, packing a batch's masks.

A mask is a uint8 HxW array of class ids with `IGNORE_INDEX` (255) for pixels nothing counts,
stored as a single-channel (L or P) PNG. `MaskLabels` maps stored ids to trained ones at decoding;
`pack_masks` concatenates a batch's masks (`PackedBatch.masks`).
"""
from __future__ import annotations

import io
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from .image import decode_errors, open_image

#: The mask value of pixels no loss or metric counts (mmseg's and torch's usual ``ignore_index``).
IGNORE_INDEX = 255

#: What a mask can be given as: PNG bytes or a path, a PIL image (``L``/``P``/``1``), a uint8 HxW array.
MaskData = Union[bytes, str, os.PathLike, np.ndarray, Any]

#: File types a mask folder is searched for (lossless only: a JPEG mask would blur its class ids).
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".pgm", ".ppm")

__all__ = ["IGNORE_INDEX", "MASK_EXTENSIONS", "MaskData", "MaskError", "MaskLabels", "batch_masks", "check_mask",
           "decode_mask", "encode_mask", "find_mask_layout", "pack_masks", "pair_masks", "unpack_masks"]


class MaskError(ValueError):
    """A mask that cannot be used (undecodable, colour-coded, not its image's size): bad data, which
    a loader logs, counts (under ``reason``) and skips, like an undecodable image."""

    reason = "bad_mask"


@dataclass(frozen=True)
class MaskLabels:
    """How stored mask values become trained ids: ``reduce_zero_label`` (0 ignored, 1..K -> 0..K-1,
    mmseg's ADE20K) and ``void`` (ids ignored); ignored pixels become `IGNORE_INDEX`."""

    reduce_zero_label: bool = False
    void: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if any(not 0 <= int(v) <= 255 for v in self.void):
            raise ValueError(f"void ids must lie in 0..255, got {self.void}")

    def lut(self) -> np.ndarray:
        """The uint8 lookup table ``stored id -> trained id``."""
        lut = np.arange(256, dtype=np.int16)
        if self.reduce_zero_label:
            lut = lut - 1
            lut[0] = IGNORE_INDEX
        for v in self.void:
            lut[int(v)] = IGNORE_INDEX
        lut[IGNORE_INDEX] = IGNORE_INDEX
        return lut.astype(np.uint8)

    def apply(self, mask: np.ndarray) -> np.ndarray:
        """``mask`` (uint8) with the stored ids mapped (a new array unless the mapping is the identity)."""
        return self.lut()[mask] if self.reduce_zero_label or self.void else mask


def _from_pil(im: Any, label: str) -> np.ndarray:
    if im.mode in ("L", "P", "1", "I", "I;16", "I;16B", "I;16L"):
        return _from_array(np.asarray(im), label)  # ids above 255 (16-bit, 32-bit) are errors there
    raise MaskError(f"{label}: a mode {im.mode} mask; expected one class id per pixel (a single-channel 'L' or "
                     "palette 'P' PNG): convert colour-coded masks to class ids first")


def _from_array(a: np.ndarray, label: str) -> np.ndarray:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim != 2:
        raise MaskError(f"{label}: a mask of shape {a.shape}; expected HxW class ids")
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer):
        if a.size and (a.min() < 0 or a.max() > 255):
            raise MaskError(f"{label}: mask ids {int(a.min())}..{int(a.max())} do not fit 0..255")
        return a.astype(np.uint8)
    raise MaskError(f"{label}: a {a.dtype} mask; expected integer class ids")


def decode_mask(data: MaskData, name: str = "", labels: Optional[MaskLabels] = None) -> np.ndarray:
    """A mask as a C-contiguous uint8 HxW array of ids (``labels`` applied); ``ValueError`` naming it when
    empty, not an image, corrupt, RGB or with ids above 255."""
    label = name or "mask"
    if isinstance(data, np.ndarray):
        mask = _from_array(data, label)
    elif hasattr(data, "getbands"):
        mask = _from_pil(data, label)
    elif isinstance(data, (bytes, bytearray, str, os.PathLike)):
        mask = _decode_file(data, label)
    else:
        raise TypeError(f"{label}: cannot read a mask from a {type(data).__name__} "
                        "(expected PNG bytes, a path, a PIL image or a uint8 HxW array)")
    if mask.size == 0:
        raise MaskError(f"{label}: empty mask of shape {mask.shape}")
    return np.ascontiguousarray((labels or MaskLabels()).apply(mask))


def _decode_file(data: Union[bytes, bytearray, str, os.PathLike], label: str) -> np.ndarray:
    with decode_errors(label, "mask", MaskError), open_image(data, label, "mask file") as im:
        im.load()
        return _from_pil(im, label)


def check_mask(mask: np.ndarray, image_shape: Sequence[int], name: str = "") -> np.ndarray:
    """``mask`` if it is uint8 HxW with the image's H and W, else a ``ValueError`` naming it."""
    h, w = int(image_shape[0]), int(image_shape[1])
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise MaskError(f"{name or 'mask'}: expected a uint8 HxW mask, got {mask.dtype} {mask.shape}")
    if mask.shape != (h, w):
        raise MaskError(f"{name or 'mask'}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH), its image {w}x{h}")
    return mask


def encode_mask(mask: np.ndarray) -> bytes:
    """A uint8 HxW mask as single-channel ('L') PNG bytes: lossless, as shards store it."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), "L").save(buf, "PNG", compress_level=6)
    return buf.getvalue()


def pack_masks(masks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, tuple[tuple[int, int], ...]]:
    """The masks of a batch as one flat uint8 array: ``(flat, offsets, sizes)``, where mask ``b``
    is ``flat[offsets[b]:offsets[b + 1]].reshape(sizes[b])`` (offsets: int64 ``[B + 1]``)."""
    sizes = tuple((int(m.shape[0]), int(m.shape[1])) for m in masks)
    offsets = np.array([0, *itertools.accumulate(h * w for h, w in sizes)], np.int64)
    flat = np.concatenate([np.asarray(m, np.uint8).reshape(-1) for m in masks] or [np.empty(0, np.uint8)])
    return flat, offsets, sizes


def batch_masks(masks: Sequence[np.ndarray], image_sizes: Sequence[tuple[int, int]], keys: Sequence[str] = (),
                same_size: bool = True) -> tuple[np.ndarray, tuple[tuple[int, int], ...]]:
    """The masks of a batch's images checked and packed: ``(flat, sizes)``. Each is its image's size
    unless ``same_size=False`` (masks kept at the original size: an eval transform's ``keep_mask_size``)."""
    if len(masks) != len(image_sizes):
        raise ValueError(f"got {len(masks)} masks for {len(image_sizes)} images")
    for b, (m, size) in enumerate(zip(masks, image_sizes)):
        check_mask(m, size if same_size else m.shape[:2], f"mask of image {b} ({keys[b] if b < len(keys) else b})")
    flat, _, sizes = pack_masks(masks)
    return flat, sizes


def unpack_masks(flat: Any, sizes: Sequence[tuple[int, int]]) -> list:
    """The per-image masks (views) of a flat array packed by `pack_masks` (NumPy array or tensor)."""
    starts = itertools.accumulate((h * w for h, w in sizes), initial=0)
    return [flat[start:start + h * w].reshape(h, w) for start, (h, w) in zip(starts, sizes)]


def pair_masks(images: Union[str, os.PathLike], masks: Union[str, os.PathLike]) -> list[tuple[Any, Any]]:
    """``[(image, mask)]`` for every image under ``images`` (sorted), its mask the same relative path and
    stem under ``masks``; an image without a mask is an error naming it."""
    from .listing import IMAGE_EXTENSIONS

    images, masks = Path(images), Path(masks)
    for d in (images, masks):
        if not d.is_dir():
            raise ValueError(f"{d}: not a directory")
    found = {}
    for p in masks.rglob("*"):
        if p.suffix.lower() in MASK_EXTENSIONS and not p.name.startswith("."):
            found.setdefault(p.relative_to(masks).with_suffix("").as_posix(), p)
    pairs, missing = [], []
    for p in sorted(images.rglob("*")):
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file():
            m = found.get(p.relative_to(images).with_suffix("").as_posix())
            (missing if m is None else pairs).append(p if m is None else (p, m))
    if missing:
        raise ValueError(f"{missing[0]}: no mask {masks / missing[0].relative_to(images).with_suffix('.png')} "
                         f"({len(missing)} of {len(missing) + len(pairs)} images have none)")
    if not pairs:
        raise ValueError(f"{images}: no images with extensions {IMAGE_EXTENSIONS}")
    return pairs


def find_mask_layout(root: Union[str, os.PathLike], split: str = "train") -> Optional[tuple[Any, Any]]:
    """``(root/images/<split>, root/annotations/<split>)`` when ``root`` has ADE20K's folder layout, else None."""
    images, masks = Path(root) / "images" / split, Path(root) / "annotations" / split
    return (images, masks) if images.is_dir() and masks.is_dir() else None
