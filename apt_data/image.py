"""Image validation, explicit conversions and decoding: kernels only ever see C-contiguous uint8 HxW or
HxWx3 arrays; anything else is converted explicitly (`to_rgb_uint8`) or rejected with a clear message."""
from __future__ import annotations

import io
import math
import os
import struct
from contextlib import contextmanager
from typing import Callable, Iterator, NamedTuple, Optional, Union

import numpy as np

PathLike = Union[str, os.PathLike]


def check_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Return ``image`` as a C-contiguous uint8 HxW or HxWx3 array (HxWx1 squeezed), or raise a clear error."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(image).__name__}"
                        " (decode files with apt_data.load_image)")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"{name}: expected shape HxWx3, HxW or HxWx1, got {image.shape}"
                         + (" (RGBA: convert with apt_data.to_rgb_uint8)" if image.ndim == 3 and image.shape[2] == 4 else ""))
    if image.dtype != np.uint8:
        raise ValueError(f"{name}: expected dtype uint8, got {image.dtype} "
                         "(convert 16-bit or float images with apt_data.to_rgb_uint8)")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name}: empty image of shape {image.shape}")
    return np.ascontiguousarray(image)


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Convert an image array to uint8 HxWx3, explicitly: gray repeated, alpha dropped, uint16 by
    ``round(v / 257)``, float in [0, 1] times 255 (clipped, rounded), bool to 0/255."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"to_rgb_uint8: cannot interpret an array of shape {a.shape} as an image")
    if a.shape[2] in (2, 4):
        a = a[:, :, :-1]
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.uint16:
        a = ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError("to_rgb_uint8: float image contains NaN or inf")
        a = np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        raise ValueError(f"to_rgb_uint8: unsupported dtype {a.dtype}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a)


def load_image(path: PathLike) -> np.ndarray:
    """Decode an image file to uint8 HxWx3 RGB at its own size (ValueError naming a bad file)."""
    return decode_image(path)


#: What PIL raises on hostile or corrupt input besides OSError (found by fuzzing, tests/test_fuzz.py, and
#: named in PIL's own plugins): each is re-raised by `decode_image` as a ValueError naming the file.
_PIL_DATA_ERRORS = (SyntaxError, struct.error, EOFError, IndexError, ZeroDivisionError, OverflowError)


def _crop_to_multiple(arr: np.ndarray, multiple: int, label: str) -> np.ndarray:
    """The centre of ``arr`` whose sides are multiples of ``multiple`` (ValueError when a side is shorter)."""
    h, w = arr.shape[:2]
    nh, nw = h - h % multiple, w - w % multiple
    if multiple <= 0 or not nh or not nw:
        raise ValueError(f"{label}: a {w}x{h} image has no {multiple}-pixel multiple to crop to")
    top, left = (h - nh) // 2, (w - nw) // 2
    return np.ascontiguousarray(arr[top:top + nh, left:left + nw])


#: The most pixels augmentation (`decode_reduced`) decodes of one image after libjpeg's draft: Pillow's
#: own ``MAX_IMAGE_PIXELS`` (Pillow itself refuses only above twice that).
MAX_DECODE_PIXELS = 89_478_485

_I16_MODES = ("I;16", "I;16B", "I;16L", "I")


class ImageTooLarge(ValueError):
    """An image that would decode to more than the allowed pixels: bad data, skipped under ``reason``."""

    reason = "too large"


class Decoded(NamedTuple):
    """`decode_reduced`'s result: uint8 ``pixels``, the ``full_size`` (H, W), and pixels per full-size pixel."""

    pixels: np.ndarray
    full_size: tuple[int, int]
    scale: float


def _label(source: Union[PathLike, bytes], name: Optional[str]) -> str:
    return name or (f"<{len(source)} bytes>" if isinstance(source, (bytes, bytearray)) else os.fspath(source))


@contextmanager
def decode_errors(label: str, what: str = "image", error: type = ValueError) -> Iterator[None]:
    """Re-raise whatever decoding ``label`` raises as ``error`` (a ValueError) naming the file and what is wrong."""
    from PIL import Image, UnidentifiedImageError

    try:
        yield
    except UnidentifiedImageError:
        raise error(f"{label}: not an image PIL can decode") from None
    except ValueError as e:  # ours, labelled already, or PIL's own (e.g. "Truncated IHDR chunk")
        if str(e).startswith(f"{label}: "):
            raise e if isinstance(e, error) else error(str(e)) from None
        raise error(f"{label}: cannot decode {what} (ValueError: {e})") from None
    except Image.DecompressionBombError as e:
        raise error(f"{label}: cannot decode {what} (decompression bomb: {e})") from None
    except MemoryError:
        raise error(f"{label}: cannot decode {what} (out of memory: image too large)") from None
    except (OSError,) + _PIL_DATA_ERRORS as e:
        raise error(f"{label}: cannot decode {what} ({type(e).__name__}: {e})") from None


def open_image(source: Union[PathLike, bytes], label: str, what: str = "file"):
    """``PIL.Image.open`` of a path or encoded bytes (reads the header only); an empty file is a ValueError."""
    from PIL import Image

    is_bytes = isinstance(source, (bytes, bytearray))
    if (len(source) if is_bytes else os.path.getsize(source)) == 0:
        raise ValueError(f"{label}: empty {what} (0 bytes)")
    return Image.open(io.BytesIO(source) if is_bytes else source)


def to_rgb_pil(im):
    """``im`` as an RGB PIL image: 16-bit scaled to 8 (`to_rgb_uint8`), gray repeated, alpha dropped."""
    from PIL import Image

    if im.mode in _I16_MODES:
        return Image.fromarray(to_rgb_uint8(np.asarray(im).astype(np.uint16)))
    return im if im.mode == "RGB" else im.convert("RGB")


def rounded_size(width: int, height: int, scale: float, multiple: int) -> tuple[int, int]:
    """(H, W) of a ``width x height`` image scaled by ``scale``, each side rounded to a multiple of ``multiple``."""
    return (max(multiple, round(height * scale / multiple) * multiple),
            max(multiple, round(width * scale / multiple) * multiple))


def decode_image(source: Union[PathLike, bytes], size: Optional[int] = None, *, crop: bool = True,
                 multiple: Optional[int] = None, name: Optional[str] = None, crop_pct: float = 1.0,
                 exif_transpose: bool = False) -> np.ndarray:
    """Decode (and optionally resize) an image to uint8 HxWx3 RGB; ``source`` is a path or bytes.

    ``size=None``: own size (cropped to multiples of ``multiple`` if given); ``crop=True``: timm's eval
    (short side ``size / crop_pct``, centre crop); ``crop=False``: short side ``size``, sides rounded to
    ``multiple`` (default 16). Large JPEGs are draft-decoded to at least twice the target. Every
    failure (empty, not an image, corrupt, decompression bomb, out of memory) is a ``ValueError``
    naming the file (docs/reliability.md).
    """
    from PIL import Image, ImageOps

    label = _label(source, name)
    if size is None and multiple is not None:
        return _crop_to_multiple(decode_image(source, name=label, crop_pct=crop_pct, exif_transpose=exif_transpose),
                                 multiple, label)
    multiple = 16 if multiple is None else multiple
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"{label}: crop_pct must be in (0, 1], got {crop_pct}")
    if size is not None and (size <= 0 or (crop and size % multiple)):
        raise ValueError(f"{label}: size {size} must be positive" + (f" and a multiple of {multiple}" if crop else ""))
    with decode_errors(label), open_image(source, label) as im:
        if size is not None and im.format == "JPEG":
            w, h = im.size
            scale = size / crop_pct / min(w, h)
            im.draft("RGB", (max(1, int(w * scale * 2)), max(1, int(h * scale * 2))))
        im.load()
        if exif_transpose:
            im = ImageOps.exif_transpose(im)
        im = to_rgb_pil(im)
        if size is None:
            return np.ascontiguousarray(np.asarray(im))
        w, h = im.size
        if crop:
            short = max(size, math.floor(size / crop_pct))
            scale = short / min(w, h)
            nw, nh = max(short, round(w * scale)), max(short, round(h * scale))
            im = im.resize((nw, nh), Image.BICUBIC)
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.crop((left, top, left + size, top + size))
        else:
            nh, nw = rounded_size(w, h, max(multiple, round(size / multiple) * multiple) / min(w, h), multiple)
            im = im.resize((nw, nh), Image.BICUBIC)
        return np.ascontiguousarray(np.asarray(im))


def decode_reduced(source: Union[PathLike, bytes], scale_for: Callable[[int, int], float], *,
                   name: Optional[str] = None, exif_transpose: bool = False,
                   max_pixels: Optional[int] = MAX_DECODE_PIXELS) -> Decoded:
    """Decode reduced as far as ``scale_for(width, height)`` (<= 1 per side) allows, in bounded memory:
    JPEGs by libjpeg's draft, others by ``Image.reduce`` a band of rows at a time (no second full-size
    copy). More than ``max_pixels`` after the draft raises `ImageTooLarge` before decoding."""
    from PIL import ImageOps

    label = _label(source, name)
    with decode_errors(label), open_image(source, label) as im:
        full_w, full_h = im.size
        scale = min(1.0, float(scale_for(full_w, full_h)))
        draft = 1  # libjpeg's scaling denominator
        if im.format == "JPEG" and scale < 1:
            drafted = im.draft("RGB", (max(1, math.ceil(full_w * scale)), max(1, math.ceil(full_h * scale))))
            draft = 1 if drafted is None else round(full_w / drafted[1][2])  # box: the full size / denominator
        if max_pixels is not None and im.size[0] * im.size[1] > max_pixels:
            raise ImageTooLarge(f"{label}: a {full_w}x{full_h} image decodes to {im.size[0]}x{im.size[1]} pixels, more "
                                f"than the decode limit of {max_pixels:,} (ImageTransform(max_pixels=...), "
                                "apt_data.image.MAX_DECODE_PIXELS)")
        orientation = im.getexif().get(0x0112, 1) if exif_transpose else 1
        im.load()
        k = max(1, min(math.floor(1 / (scale * draft)), im.size[0], im.size[1]))
        out = _reduced_rgb(im, k)
        if orientation != 1:
            out.info["exif"] = im.getexif().tobytes()
            out = ImageOps.exif_transpose(out)
            if out.size != (im.size[0] // k, im.size[1] // k):  # rotated a quarter turn
                full_w, full_h = full_h, full_w
        return Decoded(np.ascontiguousarray(np.asarray(out)), (full_h, full_w), 1.0 / (draft * k))


def _reduced_rgb(im, k: int):
    """``im`` box-reduced ``k`` times over whole blocks and converted with `to_rgb_pil`, ~4 M pixels a band."""
    from PIL import Image

    if k == 1 and im.mode == "RGB":
        return im
    w, h = im.size[0] // k, im.size[1] // k
    out = Image.new("RGB", (w, h))
    rows = max(1, (1 << 22) // (w * k * k))  # output rows a band
    for top in range(0, h, rows):
        band = to_rgb_pil(im.crop((0, top * k, w * k, min(h, top + rows) * k)))
        out.paste(band.reduce(k) if k > 1 else band, (0, top))
    return out
