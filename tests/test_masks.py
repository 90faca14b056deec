"""Segmentation masks through the transforms: image and mask stay aligned through every geometric
step (on the repository's photos, with masks made from their colour ranges), photometric steps touch
the image only, and bad masks are clear errors naming the sample."""
import io

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from apt_data.masks import IGNORE_INDEX, MaskLabels, decode_mask, encode_mask, pack_masks, unpack_masks
from apt_data.photometric import photo_metric_distortion, photometric_kernel, photometric_reference
from apt_data.transforms import ImageTransform
from conftest import IMAGE_PATHS, load_resized

#: one distinct colour per class: an image painted from its mask shows any misplaced mask pixel
PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [255, 255, 0], [0, 0, 255], [255, 0, 255],
                    [0, 255, 255], [255, 255, 255]], np.uint8)


def colour_mask(photo: np.ndarray, block: int = 8) -> np.ndarray:
    """Classes 0..7 from the colour ranges of a photo (each channel above or below 110), made blocky
    (``block`` px) so that regions are wide enough to check away from their edges."""
    h, w = photo.shape[:2]
    small = np.asarray(Image.fromarray(photo).resize((max(1, w // block), max(1, h // block)), Image.BOX))
    cls = ((small[..., 0] > 110) * 1 + (small[..., 1] > 110) * 2 + (small[..., 2] > 110) * 4).astype(np.uint8)
    return np.asarray(Image.fromarray(cls).resize((w, h), Image.NEAREST))


def agreement(image: np.ndarray, mask: np.ndarray) -> float:
    """Share of the pixels inside uniform 5x5 mask regions whose palette colour is the mask's class."""
    dist = ((image[..., None, :].astype(np.int32) - PALETTE[None, None].astype(np.int32)) ** 2).sum(-1)
    win = sliding_window_view(np.pad(mask, 2, mode="edge"), (5, 5))
    inner = (win.min((-1, -2)) == win.max((-1, -2))) & (mask != IGNORE_INDEX)
    assert inner.sum() > 100, "too few pixels to check"
    return float((dist.argmin(-1)[inner] == mask[inner]).mean())


@pytest.fixture(scope="module")
def pair():
    photo = load_resized(IMAGE_PATHS[3], (150, 200))
    mask = colour_mask(photo)
    assert len(np.unique(mask)) >= 3
    return PALETTE[mask], mask


TRANSFORMS = {
    "random resized crop": ImageTransform(size=64, augment=True, scale=(0.3, 1.0)),
    "mmseg train": ImageTransform(size=96, augment=True, resize_scale=(384, 96), cat_max_ratio=0.75),
    "mmseg train, padded": ImageTransform(size=96, augment=True, resize_scale=(384, 96), resize_ratio=(0.5, 0.6)),
    "keep aspect eval": ImageTransform(size=64, keep_aspect=True),
    "mmseg eval": ImageTransform(size=64, resize_scale=(256, 80)),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_image_and_mask_stay_aligned(pair, name):
    tr = TRANSFORMS[name]
    image, mask = pair
    flips = 0
    for seed in range(6):
        out, out_mask = tr(image, "photo", seed, mask=mask)
        assert out.shape[:2] == out_mask.shape and out_mask.dtype == np.uint8
        assert out.shape[:2] == tr.output_size(image.shape[1], image.shape[0])
        assert agreement(out, out_mask) >= 0.99
        # a wrong transform shows: the mask moved by a quarter of the width no longer fits
        assert agreement(out, np.roll(out_mask, out_mask.shape[1] // 4, axis=1)) < 0.9
        if tr.cat_max_ratio == 1.0:  # (its crop retries read the mask) the image alone is the same without one
            np.testing.assert_array_equal(tr(image, "photo", seed), out)
        flips += not np.array_equal(out_mask, tr(image, "photo", seed, mask=mask[:, ::-1])[1][:, ::-1])
    if tr.augment:
        assert flips > 0  # the random draws differ between seeds


def test_real_photo_and_its_mask(pair):
    """The photo itself (not painted) and its colour-range mask: the classes recomputed from the
    transformed photo match the transformed mask far better than a shifted one."""
    photo = load_resized(IMAGE_PATHS[3], (150, 200))
    mask = colour_mask(photo, block=1)
    tr = ImageTransform(size=96, augment=True, resize_scale=(384, 96), cat_max_ratio=0.75)
    for seed in range(4):
        out, out_mask = tr(photo, "photo", seed, mask=mask)
        cls = ((out[..., 0] > 110) * 1 + (out[..., 1] > 110) * 2 + (out[..., 2] > 110) * 4)
        valid = out_mask != IGNORE_INDEX
        good = (cls == out_mask)[valid].mean()
        bad = (cls == np.roll(out_mask, 7, axis=1))[valid].mean()
        assert good > 0.7 and good > bad + 0.1


def test_mmseg_padding_and_crop(pair):
    image, mask = pair
    tr = TRANSFORMS["mmseg train, padded"]
    out, out_mask = tr(image, "photo", 3, mask=mask)
    assert out.shape == (96, 96, 3)
    pad = out_mask == IGNORE_INDEX
    assert pad[-1].all() and not pad[0].all()  # padded at the bottom (ratio 0.5-0.6 of 96: under 96 rows)
    assert (out[pad] == np.asarray(tr.fill, np.uint8)).all()
    # scaled up to cover the crop: no padding, every pixel labelled
    out, out_mask = ImageTransform(size=96, augment=True, resize_scale=(384, 96), resize_ratio=(1.0, 2.0))(
        image, "photo", 3, mask=mask)
    assert out.shape == (96, 96, 3) and (out_mask != IGNORE_INDEX).all()


def test_cat_max_ratio_rejects_single_class_crops():
    photo = load_resized(IMAGE_PATHS[3], (150, 200))
    mask = np.zeros((150, 200), np.uint8)
    mask[:, 150:] = 1  # class 1 only in the right quarter
    strict = ImageTransform(size=48, augment=True, resize_scale=(200, 150), resize_ratio=(1.0, 1.0),
                            cat_max_ratio=0.75, hflip=0)
    loose = ImageTransform(size=48, augment=True, resize_scale=(200, 150), resize_ratio=(1.0, 1.0), hflip=0)

    def mixed(tr):
        shares = [(tr(photo, "p", s, mask=mask)[1] == 0).mean() for s in range(40)]
        return np.mean([0 < v < 0.75 for v in shares])

    assert mixed(strict) > mixed(loose) + 0.3


def test_photometric_touches_the_image_only(pair):
    image, mask = pair
    photo = load_resized(IMAGE_PATHS[5], (96, 128))
    on = ImageTransform(size=64, augment=True, resize_scale=(256, 64), photometric=True)
    off = ImageTransform(size=64, augment=True, resize_scale=(256, 64))
    changed = 0
    for seed in range(8):
        a, ma = on(photo, "p", seed, mask=mask[:96, :128])
        b, mb = off(photo, "p", seed, mask=mask[:96, :128])
        np.testing.assert_array_equal(ma, mb)
        changed += not np.array_equal(a, b)
    assert changed >= 4
    rng = np.random.default_rng(0)
    out = photo_metric_distortion(photo, rng)
    assert out.shape == photo.shape and out.dtype == np.uint8


def test_bad_masks_are_clear_errors(tmp_path):
    photo = load_resized(IMAGE_PATHS[3], (60, 80))
    tr = ImageTransform(size=32, augment=True, resize_scale=(128, 32))
    with pytest.raises(ValueError, match=r"cat\.png \(mask\): mask is 79x60 \(WxH\), its image 80x60"):
        tr(photo, "cat.png", 0, mask=np.zeros((60, 79), np.uint8))
    rgb = io.BytesIO()
    Image.fromarray(photo).save(rgb, "PNG")
    with pytest.raises(ValueError, match="mode RGB mask"):
        tr(photo, "cat.png", 0, mask=rgb.getvalue())
    with pytest.raises(ValueError, match="empty mask"):
        decode_mask(b"", "m.png")
    with pytest.raises(ValueError, match="m.png: not an image"):
        decode_mask(b"not a png", "m.png")
    with pytest.raises(ValueError, match="do not fit"):
        decode_mask(np.full((4, 4), 300, np.int32), "m")
    with pytest.raises(RuntimeError, match="RandAugment and exif_transpose"):
        ImageTransform(size=32, augment=True, auto_augment="rand-m9")(photo, "x", 0, mask=np.zeros((60, 80), np.uint8))
    with pytest.raises(RuntimeError, match="centre-cropping"):
        ImageTransform(size=32)(photo, "x", 0, mask=np.zeros((60, 80), np.uint8))


def test_mask_decoding_and_labels(tmp_path):
    mask = colour_mask(load_resized(IMAGE_PATHS[2], (40, 50)))
    data = encode_mask(mask)
    np.testing.assert_array_equal(decode_mask(data), mask)
    pal = Image.fromarray(mask, "L").convert("P")  # a palette PNG: its indices are the ids
    pal.putpalette(PALETTE.ravel().tolist())
    p = tmp_path / "m.png"
    pal.save(p)
    np.testing.assert_array_equal(decode_mask(p), mask)
    np.testing.assert_array_equal(decode_mask(mask.astype(np.int64)), mask)
    ade = decode_mask(np.array([[0, 1, 150, 255]], np.uint8), labels=MaskLabels(reduce_zero_label=True))
    np.testing.assert_array_equal(ade, [[255, 0, 149, 255]])
    camvid = decode_mask(np.array([[0, 10, 11, 255]], np.uint8), labels=MaskLabels(void=(11,)))
    np.testing.assert_array_equal(camvid, [[0, 10, 255, 255]])


def test_pack_masks_round_trip():
    masks = [colour_mask(load_resized(p, (h, w))) for p, (h, w) in zip(IMAGE_PATHS, [(32, 48), (64, 16), (16, 16)])]
    flat, offsets, sizes = pack_masks(masks)
    assert flat.dtype == np.uint8 and offsets.tolist() == [0, 32 * 48, 32 * 48 + 64 * 16, 32 * 48 + 64 * 16 + 256]
    assert sizes == ((32, 48), (64, 16), (16, 16))
    for a, b in zip(unpack_masks(flat, sizes), masks):
        np.testing.assert_array_equal(a, b)


def test_eval_can_keep_the_original_mask(pair):
    image, mask = pair
    tr = ImageTransform(size=64, resize_scale=(512, 64), keep_mask_size=True)
    out, out_mask = tr(image, "photo", 0, mask=mask)
    assert out.shape[:2] == tr.output_size(200, 150) == (64, 80)
    np.testing.assert_array_equal(out_mask, mask)  # untouched, at the original 150x200
    with pytest.raises(ValueError, match="keep_mask_size applies to eval"):
        ImageTransform(size=64, augment=True, keep_mask_size=True)


def test_photometric_kernel_matches_its_numpy_reference():
    photo = load_resized(IMAGE_PATHS[7], (64, 96))
    identity = np.arange(256, dtype=np.uint8)
    out = np.empty_like(photo)
    photometric_kernel(photo, out, identity, identity, 1.0, 0.0)
    np.testing.assert_array_equal(out, photo)  # no draw: the image unchanged
    # HSV there and back without a change is exact
    np.testing.assert_array_equal(photometric_reference(photo, identity, identity, 1.0 + 1e-9, 0.0), photo)
    rng = np.random.default_rng(0)
    for _ in range(12):
        pre = np.clip(identity * rng.uniform(0.5, 1.5) + rng.uniform(-32, 32), 0, 255).astype(np.uint8)
        post = np.clip(identity * rng.uniform(0.5, 1.5), 0, 255).astype(np.uint8)
        sat, hue = rng.uniform(0.5, 1.5), 2.0 * rng.integers(-18, 18)
        photometric_kernel(photo, out, pre, post, sat, hue)
        np.testing.assert_array_equal(out, photometric_reference(photo, pre, post, sat, hue))
    # a hue shift moves colours, a saturation of 0.5 brings them towards grey
    grey = lambda a: np.abs(a.astype(int) - a.mean(-1, keepdims=True)).mean()  # noqa: E731
    photometric_kernel(photo, out, identity, identity, 0.5, 0.0)
    assert grey(out) < 0.7 * grey(photo)


def test_segmentation_transform_is_the_mmseg_recipe():
    from apt_data.transforms import segmentation_transform

    tr = segmentation_transform(512)
    assert (tr.size, tr.resize_scale, tr.resize_ratio, tr.cat_max_ratio, tr.hflip, tr.photometric, tr.augment) == \
        (512, (2048, 512), (0.5, 2.0), 0.75, 0.5, True, True)
    ev = segmentation_transform(512, augment=False, keep_mask_size=True)
    assert not ev.augment and ev.resize_scale == (2048, 512) and ev.keep_mask_size
    assert ev.output_size(683, 512) == (512, 688)  # ADE20K-like: short side 512, long side rounded to 16
