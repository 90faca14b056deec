"""ImageTransform's augmentation: valid for every magnitude RandAugment draws; its failures are bugs
(`AugmentationError`, raised by the loader), never bad data (ValueError, skipped)."""
import random
import shutil

import numpy as np
import pytest
from PIL import Image

from apt_data import APTConfig
from apt_data.loader import APTLoader
from apt_data.transforms import AugmentationError, ImageTransform, _fix_ops, _posterize, _rand_augment
from conftest import IMAGE_PATHS, load_resized

FILL = (124, 116, 104)
HPARAMS = {"translate_const": 100, "img_mean": FILL}


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray(load_resized(IMAGE_PATHS[3], (48, 64)))


def test_every_rand_augment_op_at_extreme_magnitudes(photo):
    from timm.data import auto_augment as aa

    # magnitude noise (mstd) is clipped to [0, 10] (timm's upper bound without magnitude_max): the
    # extremes are 0 and 10; ops with a random sign (rotate, shear, translate) are drawn with both
    for name in aa.NAME_TO_OP:
        for m in (0, 10):
            op = _fix_ops([aa.AugmentOp(name, prob=1.0, magnitude=m, hparams=HPARAMS)])[0]
            for s in range(4):
                random.seed(s)
                out = op(photo)
                assert out.size == photo.size and out.mode == "RGB", (name, m)
    # the noisy op as the config builds it, clipped at both ends
    for name in ("PosterizeIncreasing", "Posterize", "SolarizeIncreasing"):
        op = _fix_ops([aa.AugmentOp(name, prob=1.0, magnitude=9, hparams={**HPARAMS, "magnitude_std": 50})])[0]
        for s in range(40):
            random.seed(s)
            op(photo)


def test_posterize_zero_bits_is_black(photo):
    out = np.asarray(_posterize(photo, 0))
    assert out.shape == (48, 64, 3) and not out.any()
    assert _posterize(photo, 8) is photo
    np.testing.assert_array_equal(np.asarray(_posterize(photo, 4)), np.asarray(photo) & 0xF0)


def test_rand_augment_config_never_fails():
    tr = ImageTransform(size=64, augment=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, fill=FILL)
    data = IMAGE_PATHS[5].read_bytes()
    img = load_resized(IMAGE_PATHS[5], (60, 80))
    for seed in range(150):
        out = tr(img if seed % 2 else data, name="x", seed=seed)
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    # the op list the transform uses is the fixed one
    ra_apply = _rand_augment("rand-m9-mstd0.5-inc1", FILL)
    assert ra_apply is _rand_augment("rand-m9-mstd0.5-inc1", FILL)


def test_augmentation_errors_raise_and_bad_data_stays_value_error(tmp_path, monkeypatch):
    tr = ImageTransform(size=64, augment=True, auto_augment="rand-m9-mstd0.5-inc1")
    with pytest.raises(ValueError, match="bad.jpg.*not an image"):
        tr(b"not an image", name="bad.jpg", seed=1)

    def broken(self, pixels, seed, mask=None):
        raise ValueError("bits must be between or equal to 1 and 8")

    monkeypatch.setattr(ImageTransform, "_augment", broken)
    with pytest.raises(AugmentationError, match=r"k\.jpg.*augmentation failed.*ValueError: bits") as info:
        tr(IMAGE_PATHS[0].read_bytes(), name="k.jpg", seed=3)
    assert isinstance(info.value, RuntimeError) and not isinstance(info.value, (ValueError, OSError))
    # the loader does not count it as a skipped bad file: it stops the run
    folder = tmp_path / "f"
    for k, p in enumerate(IMAGE_PATHS[:4]):
        (folder / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, folder / f"c{k % 2}" / p.name)
    loader = APTLoader(str(folder), APTConfig(), max_tokens=1200, num_workers=0, transform=tr, packing="plan")
    with pytest.raises(AugmentationError):
        for _ in loader:
            pass
    assert loader.stats.num_skipped == 0
