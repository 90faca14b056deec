"""Per-sample image transforms, applied to decoded pixels BEFORE patchify.

Augmentations change the image, so they must run before patch sizes are chosen: random erasing
with a constant fill, for instance, flattens a region and lowers the token count (as the paper
notes). Every random choice comes from a per-sample seed, so an epoch is reproducible no matter
which worker process handles which sample. The input is what a loader `Source` reads: encoded
bytes or a path, a PIL image, or a uint8 image array.
"""
from __future__ import annotations

import io
import math
import os
import random
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from .image import decode_image, to_rgb_uint8


@dataclass(frozen=True)
class ImageTransform:
    """Decode + resize (+ train-time augmentation) to a uint8 HxWx3 image for `patchify`.

    Eval (``augment=False``): timm's eval transform, short side ``floor(size / crop_pct)`` then a
    centre crop ``size x size``; or, with ``keep_aspect=True``, short side ``size`` and both sides
    rounded to multiples of ``multiple`` (no crop). Train (``augment=True``): RandomResizedCrop
    (``scale``, ``ratio``) to ``size x size``, horizontal flip with ``hflip``, optional timm
    RandAugment (``auto_augment``, e.g. ``"rand-m9-mstd0.5-inc1"``) and random erasing with
    probability ``re_prob`` filled with ``fill`` (the model's mean colour: zero after normalisation).
    ``exif_transpose``: apply encoded images' EXIF orientation when decoding; off by default, as in
    timm and torchvision.

    Errors: input that cannot be decoded raises ``ValueError`` (bad data: a loader skips the sample);
    a failure of the augmentation of a decoded image raises `AugmentationError`, a ``RuntimeError``
    (a bug, not bad data: a loader does not skip it).
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

    def __post_init__(self) -> None:
        if self.size <= 0 or self.size % self.multiple:
            raise ValueError(f"image size {self.size} must be a positive multiple of the patch size {self.multiple}")
        if self.augment and self.keep_aspect:
            raise ValueError("keep_aspect applies to eval transforms; train crops are size x size")

    @property
    def deterministic(self) -> bool:
        """True when the output depends on the input alone (token counts can be precomputed)."""
        return not self.augment

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(H, W) of the output for an input of ``width x height`` pixels."""
        if self.augment or not self.keep_aspect:
            return self.size, self.size
        m = self.multiple
        short = max(m, round(self.size / m) * m)
        s = short / min(width, height)
        return max(m, round(height * s / m) * m), max(m, round(width * s / m) * m)

    def __call__(self, data: Union[bytes, str, os.PathLike, Any], name: str = "", seed: int = 0) -> np.ndarray:
        """``data``: encoded bytes or a path, a PIL image, or a uint8 HxW / HxWx3 (/ HxWx4) array."""
        if not self.augment:
            return decode_image(_encoded(data, name), self.size, crop=not self.keep_aspect, multiple=self.multiple,
                                name=name or None, crop_pct=self.crop_pct, exif_transpose=self.exif_transpose)
        pixels = _decoded(data, name, self.exif_transpose)  # ValueError: bad data
        try:
            return self._augment(pixels, seed)
        except Exception as e:  # our code or timm's on a valid image: a bug, never a skipped sample
            raise AugmentationError(f"{name or 'image'}: augmentation failed on a decoded {pixels.shape} image "
                                    f"(seed {seed}): {type(e).__name__}: {e}") from e

    def prepare(self) -> None:
        """Build now what the transform would build on first use (timm's RandAugment and its imports),
        e.g. once in a loader's main process before its workers fork, instead of in every worker."""
        if self.augment and self.auto_augment:
            _rand_augment(self.auto_augment, self.fill)

    def _augment(self, pixels: np.ndarray, seed: int) -> np.ndarray:
        from PIL import Image

        rng = np.random.default_rng(seed)
        img = Image.fromarray(pixels)
        top, left, h, w = self._crop_box(img.height, img.width, rng)
        img = img.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + w, top + h))
        if rng.random() < self.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.auto_augment:
            img = _rand_augment(self.auto_augment, self.fill)(img, int(rng.integers(2**31)))
        out = np.array(img, dtype=np.uint8)
        if self.re_prob > 0 and rng.random() < self.re_prob:
            self._erase(out, rng)
        return out

    def _crop_box(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """RandomResizedCrop's box (torchvision's algorithm) drawn from ``rng``."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
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
            target = area * rng.uniform(0.02, 1 / 3)
            aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if w < w_img and h < h_img:
                top = int(rng.integers(0, h_img - h + 1))
                left = int(rng.integers(0, w_img - w + 1))
                img[top:top + h, left:left + w] = self.fill
                return


class AugmentationError(RuntimeError):
    """An augmentation failed on a decoded image: a bug in the transform, not bad data. A
    ``RuntimeError``, so loaders raise it instead of skipping the sample as they do ``ValueError``."""


def _decoded(data: Any, name: str = "", exif_transpose: bool = False) -> np.ndarray:
    """``data`` as a uint8 HxWx3 RGB array at its own size."""
    if isinstance(data, (bytes, bytearray, str, os.PathLike)):
        return decode_image(data, name=name or None, exif_transpose=exif_transpose)
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise ValueError(f"{name or 'image'}: expected a uint8 image array, got {data.dtype} "
                             "(convert it with apt_data.to_rgb_uint8)")
        return to_rgb_uint8(data)
    if hasattr(data, "getbands"):  # a PIL image
        if data.mode in ("I;16", "I;16B", "I;16L", "I"):
            return to_rgb_uint8(np.asarray(data).astype(np.uint16))
        return np.asarray(data if data.mode == "RGB" else data.convert("RGB"))
    raise TypeError(f"{name or 'image'}: cannot transform a {type(data).__name__} "
                    "(expected encoded bytes, a path, a PIL image or a uint8 array)")


def _encoded(data: Any, name: str = "") -> Union[bytes, str, os.PathLike]:
    """``data`` as `decode_image` takes it: bytes and paths as they are; decoded pixels as lossless
    (uncompressed PPM) bytes, so every input goes through the one resize of `decode_image`."""
    if isinstance(data, (bytes, bytearray, str, os.PathLike)):
        return data
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_decoded(data, name)).save(buf, "PPM")
    return buf.getvalue()


_RA_CACHE: dict = {}


def _rand_augment(config: str, fill: tuple[int, int, int]):
    """timm's RandAugment on PIL images, seeded per call (it draws from `random` and `np.random`)."""
    key = (config, fill)
    if key not in _RA_CACHE:
        from timm.data.auto_augment import rand_augment_transform

        ra = rand_augment_transform(config, {"translate_const": 100, "img_mean": tuple(fill)})
        _fix_ops(ra.ops)

        def apply(img, seed: int, _ra=ra):
            state, np_state = random.getstate(), np.random.get_state()
            random.seed(seed)
            np.random.seed(seed)
            try:
                return _ra(img)
            finally:
                random.setstate(state)
                np.random.set_state(np_state)

        _RA_CACHE[key] = apply
    return _RA_CACHE[key]


def _posterize(img, bits_to_keep, **_):
    """timm's ``posterize`` for every level it can draw: PosterizeIncreasing asks for 0 bits at
    magnitude 10, which Pillow >= 11 rejects ("bits must be between or equal to 1 and 8"); keeping
    0 bits is a black image, as Pillow < 11 and the TensorFlow reference give."""
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


def transform_from_data_config(data_config: dict, augment: bool = False, multiple: int = 16, **kw) -> ImageTransform:
    """Build an `ImageTransform` from timm's ``resolve_data_config(...)`` dict."""
    size = int(data_config["input_size"][-1])
    mean = data_config.get("mean", (0.5, 0.5, 0.5))
    fill = tuple(int(round(255 * m)) for m in mean)
    return ImageTransform(size=size, multiple=multiple, crop_pct=float(data_config.get("crop_pct", 1.0)),
                          augment=augment, fill=fill, **kw)
