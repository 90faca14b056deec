"""Bounded decoding for augmentation (issue 24.5): large images are decoded reduced as far as the
smallest random crop allows, the crop keeps its statistics, and an image over the pixel limit is a
counted skip. Peak RSS itself is measured by benchmarks/bench_decode_memory.py, not asserted here."""
import io
import math
import shutil
import warnings
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from apt_data import APTConfig
from apt_data.image import ImageTooLarge, decode_image, decode_reduced
from apt_data.loader import APTLoader
from apt_data.pipeline import skip_reason
from apt_data.sources.folder import FolderSource
from apt_data.transforms import ImageTransform, _decoded
from conftest import IMAGE_PATHS


def full_decode(t: ImageTransform, data, seed: int) -> np.ndarray:
    """The augmenting path without the reduction: full-size pixels, the crop drawn on them."""
    return t._augment(_decoded(data, "", t.exif_transpose), seed)[0]


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def big_photo(width: int, height: int) -> Image.Image:
    """A real photo upscaled: large, with real image content."""
    with Image.open(IMAGE_PATHS[3]) as im:
        return im.convert("RGB").resize((width, height), Image.BICUBIC)


def test_unreduced_photos_augment_exactly_as_a_full_decode():
    """At 224 px the test photos (about 500x375) cannot be reduced: the output is bit-identical to
    decoding at full size, so the random crop's statistics are those of before."""
    t = ImageTransform(size=224, augment=True)
    for p in IMAGE_PATHS:
        data = p.read_bytes()
        assert decode_reduced(data, t.decode_scale).scale == 1.0
        for seed in (0, 1):
            np.testing.assert_array_equal(t(data, name=p.name, seed=seed), full_decode(t, data, seed))


def test_reduced_decode_of_real_photos_matches_the_full_decode():
    """At 32 px with crops of at least half the area, libjpeg's draft reduces every photo but one
    (86x108) by 2 or 4: the crops (drawn in full-size coordinates) match the full decode's within a
    resize tolerance."""
    t = ImageTransform(size=32, augment=True, scale=(0.5, 1.0))
    reduced, diffs = 0, []
    for p in IMAGE_PATHS:
        data = p.read_bytes()
        d = decode_reduced(data, t.decode_scale)
        h, w = d.full_size
        assert (w, h) == Image.open(p).size
        assert d.pixels.shape[:2] == (math.ceil(h * d.scale), math.ceil(w * d.scale))  # libjpeg rounds up
        reduced += d.scale < 1
        for seed in range(3):
            a, b = t(data, name=p.name, seed=seed), full_decode(t, data, seed)
            diffs.append(np.abs(a.astype(int) - b.astype(int)).mean())
    assert reduced >= len(IMAGE_PATHS) - 1
    assert np.mean(diffs) < 1.0 and max(diffs) < 2.5, (np.mean(diffs), max(diffs))


@pytest.mark.parametrize("fmt, scale, small_scale", [("JPEG", 1 / 2, 1 / 8), ("PNG", 1 / 3, 1 / 13)])
def test_big_image_takes_the_reduced_path(fmt, scale, small_scale):
    """A 4000x3000 image at 112 px: the smallest crop (sqrt(0.08 * 3/4) of it, 849 px a side) allows
    224 / 849 = 0.26 of the full size. The JPEG is draft-decoded at 1/2 (libjpeg's next scale above),
    the PNG loaded and box-reduced 3 times; the output matches the full decode's."""
    data = encoded(big_photo(4000, 3000), fmt, **({"quality": 92} if fmt == "JPEG" else {"compress_level": 1}))
    t = ImageTransform(size=112, augment=True)
    assert t.decode_scale(4000, 3000) == pytest.approx(224 / (12e6 * 0.08 * 0.75) ** 0.5)
    d = decode_reduced(data, t.decode_scale)
    assert d.full_size == (3000, 4000)
    assert d.scale == scale and d.pixels.shape == (int(3000 * scale), int(4000 * scale), 3)
    for seed in range(3):
        a, b = t(data, seed=seed).astype(int), full_decode(t, data, seed).astype(int)
        assert np.abs(a - b).mean() < 1.5, (seed, np.abs(a - b).mean())
    # at 32 px: 0.075 of the size; libjpeg draws at most 1/8, a PNG is reduced 13 times
    d = decode_reduced(data, ImageTransform(size=32, augment=True).decode_scale)
    assert d.scale == small_scale and d.pixels.shape == (int(3000 * small_scale), int(4000 * small_scale), 3)


@pytest.mark.parametrize("mode", ["P", "L", "LA", "RGBA", "I;16"])
def test_reduced_png_modes_convert_like_decode_image(mode):
    """Every mode is reduced, then converted band by band exactly as `decode_image` converts it."""
    img = big_photo(1600, 1200)
    if mode == "I;16":
        src = Image.fromarray((np.asarray(img.convert("L")).astype(np.uint16) * 257))
    else:
        src = img.convert(mode)
    data = encoded(src, "PNG", compress_level=1)
    t = ImageTransform(size=32, augment=True)
    d = decode_reduced(data, t.decode_scale)
    k = round(1 / d.scale)
    assert k == int(1 / t.decode_scale(1600, 1200)) == 5 and d.pixels.shape == (240, 320, 3)
    full = decode_image(data)  # converted at full size, then box-reduced: the same pixels up to rounding
    ref = np.asarray(Image.fromarray(full).reduce(k))
    assert np.abs(d.pixels.astype(int) - ref.astype(int)).max() <= 1


def test_exif_orientation_with_a_reduced_decode():
    """A quarter-turn EXIF orientation: the reduced image and its full size are both rotated."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encoded(big_photo(2400, 1600), "JPEG", quality=92, exif=exif.tobytes())
    t = ImageTransform(size=32, augment=True, exif_transpose=True)
    d = decode_reduced(data, t.decode_scale, exif_transpose=True)
    assert d.full_size == (2400, 1600) and d.scale == 1 / 4 and d.pixels.shape == (600, 400, 3)
    full = decode_image(data, exif_transpose=True)
    assert full.shape == (2400, 1600, 3)
    ref = np.asarray(Image.fromarray(full).reduce(4))
    assert np.abs(d.pixels.astype(int) - ref.astype(int)).mean() < 2
    for seed in range(3):
        assert np.abs(t(data, seed=seed).astype(int) - full_decode(t, data, seed).astype(int)).mean() < 2
    same = decode_reduced(data, lambda w, h: 1.0, exif_transpose=True)  # no reduction: exactly decode_image's
    np.testing.assert_array_equal(same.pixels, full)


def test_over_the_pixel_limit_is_a_counted_skip(tmp_path):
    """A PNG over ``max_pixels`` is refused before decoding, named, counted as "too large"; a JPEG whose
    draft fits the limit is decoded although its full size does not."""
    png = encoded(big_photo(1200, 900), "PNG", compress_level=1)
    t = ImageTransform(size=32, augment=True, max_pixels=1_000_000)
    with pytest.raises(ImageTooLarge, match=r"big\.png: a 1200x900 image decodes to 1200x900 pixels, more than the "
                                            r"decode limit of 1,000,000") as e:
        t(png, name="big.png", seed=0)
    assert skip_reason(e.value) == "too large"
    jpeg = encoded(big_photo(1200, 900), "JPEG", quality=90)
    assert t(jpeg, seed=0).shape == (32, 32, 3)  # drafted to 150x113 first
    with pytest.raises(ImageTooLarge):
        ImageTransform(size=448, augment=True, max_pixels=1_000_000)(jpeg, seed=0)  # no draft at 448 px

    # through the loader (one pass over every sample, augmented): skipped, counted under its reason
    root = tmp_path / "data"
    for k, p in enumerate(IMAGE_PATHS[:8]):
        (root / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / f"c{k % 2}" / p.name)
    (root / "c0" / "huge.png").write_bytes(png)
    src = FolderSource(root)
    loader = APTLoader(src, APTConfig(), max_tokens=1200, num_workers=0, train=False,
                       transform=ImageTransform(size=224, augment=True, max_pixels=1_000_000))
    seen = [k for batch, _ in loader for k in batch.keys]
    assert sorted(seen) == sorted(k for k in src.keys if k != "c0/huge.png")
    assert loader.stats.skipped == {"too large": 1} and loader.stats.skipped_keys == ["c0/huge.png"]


def test_mutated_files_reduce_or_raise_value_error():
    """The fuzz cases of tests/test_fuzz.py through the reduced decode (forced to reduce, with and
    without EXIF orientation): a uint8 RGB image of the reduced size, or a ValueError naming the file."""
    from test_fuzz import fuzz_cases

    outcomes = Counter()
    for k, (name, fmt, data) in enumerate(fuzz_cases(1000, seed=2)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, "Corrupt EXIF data", ...
            try:
                d = decode_reduced(data, lambda w, h: 0.3, name=name, exif_transpose=k % 2 == 0)
            except ValueError as e:
                assert name in str(e)
                outcomes["ValueError"] += 1
                continue
        assert d.pixels.dtype == np.uint8 and d.pixels.ndim == 3 and d.pixels.shape[2] == 3
        assert all(a <= b for a, b in zip(sorted(d.pixels.shape[:2]), sorted(d.full_size))) and d.scale <= 1
        outcomes["ok"] += 1
    assert outcomes["ok"] > 150 and outcomes["ValueError"] > 150, outcomes
