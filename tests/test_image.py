"""Input validation and explicit conversions: bad input gets a clear error, never a Numba crash."""
import numpy as np
import pytest
from PIL import Image

from apt_data import APTConfig, check_image, decode_image, load_image, patchify, score_maps, to_rgb_uint8
from conftest import IMAGE_PATHS, load_resized


@pytest.fixture(scope="module")
def photo():
    return load_resized(IMAGE_PATHS[0], 64)


@pytest.mark.parametrize("bad, match", [
    (lambda a: np.dstack([a, np.full(a.shape[:2], 255, np.uint8)]), "RGBA"),
    (lambda a: a.astype(np.uint16) * 257, "uint16"),
    (lambda a: a.astype(np.float32) / 255, "float32"),
    (lambda a: a[None], "shape"),
    (lambda a: a[:, :, :2], "shape"),
    (lambda a: a[:0], "empty"),
    (lambda a: a.tolist(), "numpy array"),
])
def test_bad_inputs_raise_clear_errors(photo, bad, match):
    bad_img = bad(photo)
    for fn in (lambda: patchify(bad_img, APTConfig()), lambda: score_maps(bad_img, 16, 3)):
        with pytest.raises((ValueError, TypeError), match=match):
            fn()


def test_to_rgb_uint8_conversions(photo):
    rgba = np.dstack([photo, np.full(photo.shape[:2], 7, np.uint8)])
    np.testing.assert_array_equal(to_rgb_uint8(rgba), photo)  # alpha dropped
    wide = photo.astype(np.uint16) * 257  # 8-bit values stretched to 16 bits
    np.testing.assert_array_equal(to_rgb_uint8(wide), photo)
    np.testing.assert_array_equal(to_rgb_uint8(photo.astype(np.float64) / 255.0), photo)
    gray = photo[:, :, 1]
    rgb = to_rgb_uint8(gray)
    assert rgb.shape == photo.shape and (rgb == gray[:, :, None]).all()
    with pytest.raises(ValueError, match="NaN"):
        to_rgb_uint8(np.full((4, 4), np.nan))
    # converted inputs are accepted and give the same layout as the original
    layout = patchify(to_rgb_uint8(rgba), APTConfig())
    ref = patchify(photo, APTConfig())
    np.testing.assert_array_equal(layout.scale, ref.scale)


def test_non_contiguous_and_single_channel_inputs(photo):
    flipped = photo[:, ::-1]  # negative stride view
    assert not flipped.flags.c_contiguous
    a = score_maps(flipped, 16, 3)
    b = score_maps(np.ascontiguousarray(flipped), 16, 3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    g1 = photo[:, :, :1]
    np.testing.assert_array_equal(score_maps(g1, 16, 2)[1], score_maps(photo[:, :, 0].copy(), 16, 2)[1])
    assert check_image(g1).shape == photo.shape[:2]


def test_load_image_real_files(tmp_path):
    gray_path = next(p for p in IMAGE_PATHS if Image.open(p).mode == "L")
    img = load_image(gray_path)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert (img[..., 0] == img[..., 1]).all()
    # 16-bit PNG: scaled to 8 bits
    src = load_resized(IMAGE_PATHS[1], 32, mode="L").astype(np.uint16) * 257
    Image.fromarray(src).save(tmp_path / "deep.png")
    deep = load_image(tmp_path / "deep.png")
    np.testing.assert_array_equal(deep[..., 0], (src // 257).astype(np.uint8))


def test_load_image_bad_files_name_the_file(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.jpg.*0 bytes"):
        load_image(empty)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="notes.jpg.*not an image"):
        load_image(text)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(IMAGE_PATHS[0].read_bytes()[:2000])
    with pytest.raises(ValueError, match="cut.jpg"):
        load_image(truncated)


def test_config_validation():
    assert APTConfig().thresholds == (5.5, 4.0)
    assert APTConfig(num_scales=2, thresholds=[5]).thresholds == (5.0,)
    with pytest.raises(ValueError, match="one value per scale"):
        APTConfig(num_scales=3, thresholds=(5.5,))
    with pytest.raises(ValueError, match="patch_size"):
        APTConfig(patch_size=0)
    with pytest.raises(ValueError, match="patch_size"):
        APTConfig(patch_size=16.0)
    with pytest.raises(ValueError, match="scorer"):
        APTConfig(scorer="variance")
    with pytest.raises(ValueError, match="num_scales"):
        APTConfig(num_scales=0, thresholds=())
    with pytest.raises(ValueError, match="NaN"):
        APTConfig(thresholds=(float("nan"), 4.0))
    assert APTConfig(patch_size=14).max_patch_size == 56
    assert APTConfig(patch_size=14).patch_sizes() == (14, 28, 56)


def test_decode_image_resizes_and_crops_like_timm_eval():
    path = max(IMAGE_PATHS, key=lambda p: p.stat().st_size)  # large enough for draft-mode decoding
    data = path.read_bytes()
    full = load_image(path)
    sq = decode_image(data, 224, name=path.name)
    assert sq.shape == (224, 224, 3) and sq.dtype == np.uint8
    h, w = full.shape[:2]
    keep = decode_image(path, 224, crop=False, multiple=16)
    assert keep.shape[0] % 16 == 0 and keep.shape[1] % 16 == 0
    assert min(keep.shape[:2]) == 224
    assert abs(keep.shape[1] / keep.shape[0] - w / h) < 16 / 224 + 1e-6
    # same pixels as PIL's own resize+crop, up to the draft-mode decode of large JPEGs
    with Image.open(path) as im:
        im = im.convert("RGB")
        s = 224 / min(im.size)
        big = im.resize((max(224, round(im.size[0] * s)), max(224, round(im.size[1] * s))), Image.BICUBIC)
        l, t = (big.size[0] - 224) // 2, (big.size[1] - 224) // 2
        want = np.asarray(big.crop((l, t, l + 224, t + 224))).astype(int)
    assert np.abs(want - sq.astype(int)).mean() < 3.0
    with pytest.raises(ValueError, match="multiple of 16"):
        decode_image(data, 100)
    with pytest.raises(ValueError, match="0 bytes"):
        decode_image(b"", 224, name="sample-7")
    with pytest.raises(ValueError, match="sample-8.*not an image"):
        decode_image(b"hello", 224, name="sample-8")


def test_exif_orientation_is_applied_only_on_request(tmp_path):
    from apt_data.transforms import ImageTransform, _decoded

    with Image.open(IMAGE_PATHS[2]) as im:
        small = im.convert("RGB").resize((64, 48), Image.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 64x48, shown rotated 90 degrees clockwise (48 wide, 64 high)
    path = tmp_path / "rotated.jpg"
    small.save(path, quality=95, exif=exif.tobytes())
    stored = decode_image(path)
    assert stored.shape == (48, 64, 3)  # the default (as timm and torchvision) ignores the tag
    upright = decode_image(path, exif_transpose=True)
    np.testing.assert_array_equal(upright, np.rot90(stored, k=-1))
    data = path.read_bytes()
    assert decode_image(data, 32, crop=False, name="r.jpg").shape == (32, 48, 3)
    assert decode_image(data, 32, crop=False, name="r.jpg", exif_transpose=True).shape == (48, 32, 3)
    # passed through by ImageTransform, eval and train
    assert ImageTransform(size=32, keep_aspect=True)(data).shape == (32, 48, 3)
    assert ImageTransform(size=32, keep_aspect=True, exif_transpose=True)(data).shape == (48, 32, 3)
    assert _decoded(data, "r.jpg", exif_transpose=True).shape == (64, 48, 3)
    assert ImageTransform(size=32, augment=True, exif_transpose=True)(data, seed=1).shape == (32, 32, 3)


def test_pil_errors_become_value_errors_naming_the_file(tmp_path):
    import io

    buf = io.BytesIO()
    Image.fromarray(load_resized(IMAGE_PATHS[0], 16)).save(buf, "PNG")
    png = bytearray(buf.getvalue())
    png[8:12] = (12).to_bytes(4, "big")  # IHDR length 12 < 13: PIL raises its own, unlabelled ValueError
    with pytest.raises(ValueError, match="ihdr.png: cannot decode.*Truncated IHDR"):
        decode_image(bytes(png), name="ihdr.png")
    png = bytearray(buf.getvalue())
    png[12:16] = b"IHDq"  # a broken chunk type: PIL raises SyntaxError while loading
    with pytest.raises(ValueError, match="chunk.png: "):
        decode_image(bytes(png), 16, name="chunk.png")
    import struct
    import zlib

    bomb = bytearray(buf.getvalue())
    bomb[16:24] = struct.pack(">II", 30000, 30000)  # the IHDR size field edited: 900 Mpixel (CRC fixed)
    bomb[29:33] = struct.pack(">I", zlib.crc32(bytes(bomb[12:29])))
    (tmp_path / "bomb.png").write_bytes(bytes(bomb))
    with pytest.raises(ValueError, match="bomb.png.*decompression bomb"):
        load_image(tmp_path / "bomb.png")
