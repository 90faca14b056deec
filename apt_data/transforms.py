"""Per-sample image transforms on decoded pixels, BEFORE patchify: augmentation changes token counts.

Every random choice comes from a per-sample seed, so an epoch is reproducible on any worker.
"""
from __future__ import annotations

import functools
import io
import math
import os
import random
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from .image import MAX_DECODE_PIXELS, decode_image, decode_reduced, rounded_size, to_rgb_pil, to_rgb_uint8
from .masks import IGNORE_INDEX, MaskData, check_mask, decode_mask
from .photometric import photo_metric_distortion

_ENCODED = (bytes, bytearray, str, os.PathLike)  # what is decoded, not taken as pixels


@dataclass(frozen=True)
class ImageTransform:
    """Decode + resize (+ train-time augmentation) to a uint8 HxWx3 image for `patchify`.

    Eval: timm's (short side ``size / crop_pct``, centre crop), or ``keep_aspect`` (short side
    ``size``, sides multiples of ``multiple``). Train: RandomResizedCrop, flip, optional RandAugment
    (``auto_augment``), random erasing filled with ``fill``; decoded reduced as far as the smallest
    crop allows, over ``max_pixels`` is `ImageTooLarge`. ``resize_scale`` selects mmseg's ADE20K
    pipeline (docs/dense.md); with a ``mask`` the call returns ``(image, mask)``, moved together.
    Undecodable input or a mismatched mask raises ``ValueError`` (skipped); a failing augmentation or a
    setting that cannot carry a mask raises ``RuntimeError`` (docs/reliability.md, docs/loader.md).
    """

    size: int = 224
    multiple: int = 16
    crop_pct: float = 1.0
    keep_aspect: bool = False
    augment: bool = False
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    auto_augment: Optional[str] = None
    re_prob: float = 0.0
    fill: tuple[int, int, int] = (128, 128, 128)
    exif_transpose: bool = False
    max_pixels: Optional[int] = MAX_DECODE_PIXELS
    resize_scale: Optional[tuple[int, int]] = None
    resize_ratio: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 1.0
    photometric: bool = False
    ignore_index: int = IGNORE_INDEX
    keep_mask_size: bool = False

    def __post_init__(self) -> None:
        if self.size <= 0 or self.size % self.multiple:
            raise ValueError(f"image size {self.size} must be a positive multiple of the patch size {self.multiple}")
        if self.augment and self.keep_aspect:
            raise ValueError("keep_aspect applies to eval transforms; train crops are size x size")
        if self.resize_scale is not None and (len(self.resize_scale) != 2 or min(self.resize_scale) <= 0):
            raise ValueError(f"resize_scale must be two positive sides (long, short), got {self.resize_scale}")
        if not 0 < self.resize_ratio[0] <= self.resize_ratio[1]:
            raise ValueError(f"resize_ratio must be 0 < min <= max, got {self.resize_ratio}")
        if self.keep_mask_size and self.augment:
            raise ValueError("keep_mask_size applies to eval transforms; train masks move with their crops")
        if not 0.0 < self.cat_max_ratio <= 1.0:
            raise ValueError(f"cat_max_ratio must lie in (0, 1], got {self.cat_max_ratio}")

    @property
    def deterministic(self) -> bool:
        """True when the output depends on the input alone (token counts can be precomputed)."""
        return not self.augment

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(H, W) of the output for an input of ``width x height`` pixels."""
        if self.augment or not (self.keep_aspect or self.resize_scale):
            return self.size, self.size
        m = self.multiple
        if self.resize_scale is not None:
            s = min(max(self.resize_scale) / max(width, height), min(self.resize_scale) / min(width, height))
        else:
            s = max(m, round(self.size / m) * m) / min(width, height)
        return rounded_size(width, height, s, m)

    def __call__(self, data: Union[bytes, str, os.PathLike, Any], name: str = "", seed: int = 0,
                 mask: Optional[MaskData] = None):
        """``data``: encoded bytes or a path, a PIL image, or a uint8 HxW / HxWx3 (/ HxWx4) array.
        Returns the image, or ``(image, mask)`` when a ``mask`` is given."""
        if mask is None and not self.augment and self.resize_scale is None:
            return decode_image(_encoded(data, name), self.size, crop=not self.keep_aspect, multiple=self.multiple,
                                name=name or None, crop_pct=self.crop_pct, exif_transpose=self.exif_transpose)
        if mask is None and self.augment and self.resize_scale is None and isinstance(data, _ENCODED):
            pixels, full_size, scale = decode_reduced(data, self.decode_scale, name=name or None,  # bad: ValueError
                                                      exif_transpose=self.exif_transpose, max_pixels=self.max_pixels)
        else:
            pixels = _decoded(data, name, self.exif_transpose)
            full_size, scale = pixels.shape[:2], 1.0
        labels = None
        if mask is not None:
            labels = check_mask(decode_mask(mask, f"{name or 'image'} (mask)"), pixels.shape, f"{name or 'image'} (mask)")
            if self.auto_augment or self.exif_transpose:  # settings, not bad data: never a skipped sample
                raise RuntimeError("RandAugment and exif_transpose move the image without its mask: turn them off "
                                   "with masks (photometric=True distorts the image alone)")
            if not (self.augment or self.keep_aspect or self.resize_scale):
                raise RuntimeError("a centre-cropping eval transform cuts labelled pixels: use keep_aspect=True or "
                                   "resize_scale with masks")
        try:
            out = self._augment(pixels, seed, labels, full_size, scale) if self.augment else self._resize(pixels, labels)
        except Exception as e:  # our code or timm's on a valid image: a bug, never a skipped sample
            raise AugmentationError(f"{name or 'image'}: augmentation failed on a decoded {pixels.shape} image "
                                    f"(seed {seed}): {type(e).__name__}: {e}") from e
        return out if mask is not None else out[0]

    def _resize(self, pixels: np.ndarray, mask: Optional[np.ndarray]):
        """The eval geometry (keep_aspect or resize_scale) on the image and its mask."""
        h, w = pixels.shape[:2]
        oh, ow = self.output_size(w, h)
        img, out = resample_pair(pixels, None if self.keep_mask_size else mask, (0, 0, w, h), (ow, oh), False)
        return img, mask if self.keep_mask_size else out

    def prepare(self) -> None:
        """Build RandAugment now (e.g. in the main process before workers fork), not in every worker."""
        if self.augment and self.auto_augment:
            _rand_augment(self.auto_augment, self.fill)

    def decode_scale(self, width: int, height: int) -> float:
        """How far (<= 1 per side) an image may be reduced before the random crop: the smallest crop keeps
        ``2 * size`` pixels a side, as `decode_image` does for eval."""
        smallest = min(width, height, math.sqrt(width * height * self.scale[0] * min(self.ratio[0], 1 / self.ratio[1])))
        return min(1.0, 2 * self.size / max(1.0, smallest))

    def _augment(self, pixels: np.ndarray, seed: int, mask: Optional[np.ndarray] = None,
                 full_size: Optional[tuple[int, int]] = None, scale: float = 1.0):
        """``pixels`` (and ``mask``) augmented; the crop is drawn at ``full_size``, mapped by ``scale``."""
        rng = np.random.default_rng(seed)
        if self.resize_scale is not None:
            img, mask = self._resize_crop(pixels, mask, rng)
        else:
            top, left, h, w = self._crop_box(*(full_size or pixels.shape[:2]), rng)
            box = (left, top, left + w, top + h)
            if scale != 1.0:
                box = tuple(min(v * scale, lim) for v, lim in zip(box, (pixels.shape[1], pixels.shape[0]) * 2))
            img, mask = resample_pair(pixels, mask, box, (self.size, self.size), rng.random() < self.hflip)
        if self.auto_augment:
            from PIL import Image

            img = np.array(_rand_augment(self.auto_augment, self.fill)(Image.fromarray(img), int(rng.integers(2**31))),
                           dtype=np.uint8)
        if self.photometric:
            img = photo_metric_distortion(img, rng)
        if self.re_prob > 0 and rng.random() < self.re_prob:
            img = np.array(img)
            self._erase(img, rng)
        return img, mask

    def _resize_crop(self, pixels: np.ndarray, mask: Optional[np.ndarray], rng: np.random.Generator):
        """mmseg's RandomResize + RandomCrop (cat_max_ratio) + flip + pad, as one resampling of the source box."""
        h, w = pixels.shape[:2]
        r = rng.uniform(*self.resize_ratio)
        f = min(max(self.resize_scale) * r / max(w, h), min(self.resize_scale) * r / min(w, h))
        nw, nh = max(1, int(w * f + 0.5)), max(1, int(h * f + 0.5))
        ch, cw = min(self.size, nh), min(self.size, nw)
        sx, sy = w / nw, h / nh

        def crop_box() -> tuple[float, float, float, float]:  # a random crop of the resized image, in source pixels
            top, left = int(rng.integers(nh - ch + 1)), int(rng.integers(nw - cw + 1))
            return left * sx, top * sy, (left + cw) * sx, (top + ch) * sy

        box = crop_box()
        for _ in range(10 if mask is not None and self.cat_max_ratio < 1.0 else 0):
            # the crop's own mask, as it will be cut (nearest: no second resampling)
            cut = resample_pair(mask, None, box, (cw, ch), False, nearest=True)[0]
            counts = np.bincount(cut.ravel(), minlength=256)
            counts[self.ignore_index] = 0
            if np.count_nonzero(counts) > 1 and counts.max() < self.cat_max_ratio * counts.sum():
                break
            box = crop_box()
        img, mask = resample_pair(pixels, mask, box, (cw, ch), rng.random() < self.hflip)
        if (ch, cw) != (self.size, self.size):  # mmseg pads after normalising, with 0: the mean colour here
            img = _pad(img, self.size, np.asarray(self.fill, np.uint8))
            mask = None if mask is None else _pad(mask, self.size, self.ignore_index)
        return img, mask

    def _crop_box(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """RandomResizedCrop's box (torchvision's algorithm) drawn from ``rng``."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            w, h = _random_box(rng, area, self.scale, log_ratio)
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def _erase(self, img: np.ndarray, rng: np.random.Generator) -> None:
        """timm RandomErasing ('const' mode: one box, 2-33% of the area) in place."""
        h_img, w_img = img.shape[:2]
        area = h_img * w_img
        for _ in range(10):
            h, w = _random_box(rng, area, (0.02, 1 / 3), (math.log(0.3), math.log(1 / 0.3)))
            if w < w_img and h < h_img:
                top = int(rng.integers(0, h_img - h + 1))
                left = int(rng.integers(0, w_img - w + 1))
                img[top:top + h, left:left + w] = self.fill
                return


def _random_box(rng: np.random.Generator, area: int, scale: tuple, log_ratio: tuple) -> tuple[int, int]:
    """One try of torchvision's random box: ``area * U(scale)`` pixels at an aspect ``exp(U(log_ratio))``;
    its sides ``(round(sqrt(target * aspect)), round(sqrt(target / aspect)))``."""
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    return int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))


class AugmentationError(RuntimeError):
    """An augmentation failed on a decoded image: a bug, not bad data, so loaders do not skip it."""


def resample_pair(pixels: np.ndarray, mask: Optional[np.ndarray], box: tuple, size: tuple[int, int], flip: bool,
              nearest: bool = False) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """The one geometric step: ``box`` (l, t, r, b) resized to ``size`` (W, H), bicubic (mask: nearest),
    flipped with ``flip``; the same box for image and mask keeps them aligned."""
    from PIL import Image

    def one(a: np.ndarray, resample) -> np.ndarray:
        im = Image.fromarray(a)
        if im.size != size or tuple(box) != (0, 0, a.shape[1], a.shape[0]):
            im = im.resize(size, resample, box=tuple(float(v) for v in box))
        if flip:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(im, dtype=np.uint8)

    return (one(pixels, Image.NEAREST if nearest else Image.BICUBIC),
            None if mask is None else one(mask, Image.NEAREST))


def _pad(a: np.ndarray, size: int, value) -> np.ndarray:
    """``a`` padded at the bottom and right to ``size x size`` with ``value`` (mmseg's Pad)."""
    out = np.empty((size, size) + a.shape[2:], np.uint8)
    out[...] = value
    out[:a.shape[0], :a.shape[1]] = a
    return out


def _decoded(data: Any, name: str = "", exif_transpose: bool = False) -> np.ndarray:
    """``data`` as a uint8 HxWx3 RGB array at its own size."""
    if isinstance(data, _ENCODED):
        return decode_image(data, name=name or None, exif_transpose=exif_transpose)
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise ValueError(f"{name or 'image'}: expected a uint8 image array, got {data.dtype} "
                             "(convert it with apt_data.to_rgb_uint8)")
        return to_rgb_uint8(data)
    if hasattr(data, "getbands"):  # a PIL image
        return np.asarray(to_rgb_pil(data))
    raise TypeError(f"{name or 'image'}: cannot transform a {type(data).__name__} "
                    "(expected encoded bytes, a path, a PIL image or a uint8 array)")


def _encoded(data: Any, name: str = "") -> Union[bytes, str, os.PathLike]:
    """``data`` as `decode_image` takes it: decoded pixels become lossless PPM bytes (one resize path)."""
    if isinstance(data, _ENCODED):
        return data
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_decoded(data, name)).save(buf, "PPM")
    return buf.getvalue()


@functools.lru_cache(maxsize=None)
def _rand_augment(config: str, fill: tuple[int, int, int]):
    """timm's RandAugment on PIL images, seeded per call (it draws from `random` and `np.random`)."""
    from timm.data.auto_augment import rand_augment_transform

    ra = rand_augment_transform(config, {"translate_const": 100, "img_mean": tuple(fill)})
    _fix_ops(ra.ops)

    def apply(img, seed: int):
        state, np_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            return ra(img)
        finally:
            random.setstate(state)
            np.random.set_state(np_state)

    return apply


def _posterize(img, bits_to_keep, **_):
    """timm's ``posterize`` at every level: 0 bits (rejected by Pillow >= 11) is a black image."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * (256 * len(img.getbands())))
    from PIL import ImageOps

    return ImageOps.posterize(img, int(bits_to_keep))


def _fix_ops(ops: list) -> list:
    """Make timm ``AugmentOp`` s valid for every magnitude they draw (in place): only posterize changes."""
    from timm.data import auto_augment as aa

    for op in ops:
        if op.aug_fn is aa.posterize:
            op.aug_fn = _posterize
    return ops


def segmentation_transform(size: int = 512, augment: bool = True, multiple: int = 16,
                           fill: tuple[int, int, int] = (128, 128, 128),
                           keep_mask_size: bool = False) -> ImageTransform:
    """mmseg's ADE20K recipe at crop ``size``, resize scale ``(4 * size, size)``."""
    mode = dict(augment=True, cat_max_ratio=0.75, photometric=True) if augment else dict(keep_mask_size=keep_mask_size)
    return ImageTransform(size=size, multiple=multiple, resize_scale=(4 * int(size), int(size)), fill=fill, **mode)


def transform_from_data_config(data_config: dict, augment: bool = False, multiple: int = 16, **kw) -> ImageTransform:
    """Build an `ImageTransform` from timm's ``resolve_data_config(...)`` dict."""
    size = int(data_config["input_size"][-1])
    mean = data_config.get("mean", (0.5, 0.5, 0.5))
    fill = tuple(int(round(255 * m)) for m in mean)
    return ImageTransform(size=size, multiple=multiple, crop_pct=float(data_config.get("crop_pct", 1.0)),
                          augment=augment, fill=fill, **kw)
