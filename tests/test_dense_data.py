"""Dense data end to end: image + mask folders and datasets as sources, masks through the loader's
batches (both packing modes, worker processes included) and CutMix; on the repository's photos with
masks made from their colour ranges."""
import numpy as np
import pytest
from PIL import Image

from apt_data import APTConfig
from apt_data.loader import APTLoader
from apt_data.masks import IGNORE_INDEX, MaskLabels, encode_mask
from apt_data.mixing import MixConfig, MixDraw, apply_mix
from apt_data.pipeline import SamplePipeline, SkipLog
from apt_data.sources import DatasetSource, MaskFolderSource, open_mask_folder
from apt_data.transforms import ImageTransform
from conftest import IMAGE_PATHS, load_resized
from test_masks import colour_mask

SIZES = [(120, 160), (160, 120), (96, 144), (128, 128)]


def classes_of(image: np.ndarray) -> np.ndarray:
    """The colour-range classes `colour_mask` gives a photo, pixel by pixel."""
    return ((image[..., 0] > 110) * 1 + (image[..., 1] > 110) * 2 + (image[..., 2] > 110) * 4).astype(np.uint8)


def write_pairs(root, split: str, n: int, offset: int = 0):
    """ADE20K's layout under ``root``: ``images/<split>/*.jpg`` (real photos) + ``annotations/<split>/*.png``."""
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    for k in range(n):
        photo = load_resized(IMAGE_PATHS[offset + k], SIZES[k % len(SIZES)])
        Image.fromarray(photo).save(root / "images" / split / f"img{k:03d}.png")
        (root / "annotations" / split / f"img{k:03d}.png").write_bytes(encode_mask(colour_mask(photo, block=1)))


@pytest.fixture(scope="module")
def dense_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    write_pairs(root, "train", 12)
    write_pairs(root, "val", 4, offset=12)
    return root


def rebuild_images(batch) -> list:
    """Every image of a batch pasted back together from its full-resolution token pixels."""
    out = [np.zeros((h, w, 3), np.uint8) for h, w in batch.image_sizes]
    p = batch.patch_size
    for s in range(batch.num_scales):
        side = p << s
        for pix, (b, y, x) in zip(batch.pixels[s].numpy(), batch.coords[s].numpy()):
            out[b][y * p:y * p + side, x * p:x * p + side] = pix.transpose(1, 2, 0)
    return out


def test_mask_folder_sources(dense_root, tmp_path):
    src = MaskFolderSource.from_layout(dense_root, "train")
    assert len(src) == 12 and src.has_masks and src.keys[0] == "img000.png"
    image, mask = src.read_with_mask(0)
    assert isinstance(image, bytes) and mask.shape == SIZES[0] and mask.dtype == np.uint8
    same = open_mask_folder(dense_root / "images" / "val", dense_root / "annotations" / "val")
    assert len(same) == 4 and len(open_mask_folder(dense_root, split="val")) == 4
    # ids mapped at reading: CamVid's void id, ADE20K's reduce_zero_label
    void = MaskFolderSource.from_layout(dense_root, "train", mask_labels=MaskLabels(void=(0,)))
    np.testing.assert_array_equal(void.read_mask(0) == IGNORE_INDEX, mask == 0)
    # an image without its mask: an error naming it
    (dense_root / "images" / "train" / "lonely.jpg").write_bytes(IMAGE_PATHS[0].read_bytes())
    try:
        with pytest.raises(ValueError, match=r"lonely\.jpg: no mask .*lonely\.png \(1 of 13 images have none\)"):
            MaskFolderSource.from_layout(dense_root, "train")
    finally:
        (dense_root / "images" / "train" / "lonely.jpg").unlink()
    with pytest.raises(ValueError, match="no images/test and annotations/test"):
        MaskFolderSource.from_layout(dense_root, "test")


def test_dataset_source_takes_segmentation_items(dense_root):
    """Items as a Hugging Face segmentation split gives them: dicts of PIL images, or (image, mask) pairs."""
    folder = MaskFolderSource.from_layout(dense_root, "val")
    pil = [{"image": Image.open(p).convert("RGB"), "annotation": Image.open(m)}
           for p, m in zip(folder.paths, folder.mask_paths)]
    for items in (pil, [(np.asarray(d["image"]), np.asarray(d["annotation"])) for d in pil]):
        src = DatasetSource(items, masks=True)
        assert src.has_masks and src.labels.tolist() == [0] * 4
        for i in range(4):
            image, mask = src.read_with_mask(i)
            np.testing.assert_array_equal(mask, folder.read_mask(i))
            assert np.asarray(image).shape[:2] == mask.shape
    with pytest.raises(TypeError, match="mask_key"):
        DatasetSource([{"image": pil[0]["image"], "other": 1}], masks=True).read_with_mask(0)


@pytest.mark.parametrize("packing,workers", [("plan", 0), ("stream", 0), ("stream", 2)])
def test_batches_carry_the_masks_of_their_images(dense_root, packing, workers):
    src = MaskFolderSource.from_layout(dense_root, "train")
    # (no photometric distortion: the colour check below reads the colours)
    tr = ImageTransform(size=96, augment=True, resize_scale=(384, 96), cat_max_ratio=0.75)
    cfg = APTConfig(patch_size=16, num_scales=2, thresholds=(5.5,))
    loader = APTLoader(src, cfg, max_tokens=160, transform=tr, num_workers=workers, packing=packing,
                       steps_per_epoch=3 if packing == "stream" else None, seed=3)
    pipe = SamplePipeline(src, cfg, tr, seed=3)
    seen = 0
    for batch, _ in loader:
        assert batch.masks is not None and batch.mask_sizes == batch.image_sizes
        assert batch.masks.numel() == sum(h * w for h, w in batch.image_sizes)
        padded = batch.padded_masks()
        for b, (key, image) in enumerate(zip(batch.keys, rebuild_images(batch))):
            mask = batch.mask(b).numpy()
            np.testing.assert_array_equal(padded[b, :mask.shape[0], :mask.shape[1]].numpy(), mask)
            # exactly the sample's transformed image and mask (epoch 0, its own seed)
            ref_img, ref_mask, _, _ = pipe.load_with_mask(src.keys.index(key), 0)
            np.testing.assert_array_equal(image, ref_img)
            np.testing.assert_array_equal(mask, ref_mask)
            # and the mask still describes the image: its colour classes, not a shifted copy's
            valid = mask != IGNORE_INDEX
            good = (classes_of(image) == mask)[valid].mean()
            assert good > 0.6 and good > (classes_of(image) == np.roll(mask, 9, axis=1))[valid].mean() + 0.1
            seen += 1
    assert seen >= 6


def test_cutmix_mixes_masks_and_mixup_is_refused(dense_root):
    src = MaskFolderSource.from_layout(dense_root, "val")
    tr = ImageTransform(size=96, resize_scale=(384, 96))
    (a, ma), (b, mb) = (tr(*src.read_with_mask(i)[:1], "x", 0, mask=src.read_mask(i)) for i in (0, 1))
    draw = MixDraw(partner=1, cutmix=True, lam=0.7, centre=(0.5, 0.5))
    out, lam, mask = apply_mix(a, b, draw, mask=ma, partner_mask=mb)
    pasted = out != a
    assert 0 < lam < 1 and pasted.any()
    box = np.zeros(ma.shape, bool)
    ys, xs = np.nonzero(pasted.any(-1))
    box[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
    partner_mb = np.asarray(Image.fromarray(mb).resize(ma.shape[::-1], Image.NEAREST))
    np.testing.assert_array_equal(mask[box], partner_mb[box])
    np.testing.assert_array_equal(mask[~box], ma[~box])
    with pytest.raises(RuntimeError, match="Mixup does not apply to segmentation masks"):
        apply_mix(a, b, MixDraw(partner=1, cutmix=False, lam=0.5), mask=ma, partner_mask=mb)
    pipe = SamplePipeline(src, APTConfig(), tr, mix=MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0))
    with pytest.raises(RuntimeError, match="CutMix only"):
        pipe.load_with_mask(0, 0)
    cut = SamplePipeline(src, APTConfig(), tr, mix=MixConfig(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0))
    img, mask, layout, target = cut.load_with_mask(0, 0)
    assert target is not None and mask.shape == img.shape[:2]


def test_mis_sized_mask_is_a_counted_skip(dense_root, tmp_path):
    write_pairs(tmp_path, "train", 4)
    bad = tmp_path / "annotations" / "train" / "img001.png"
    bad.write_bytes(encode_mask(np.zeros((10, 10), np.uint8)))
    src = MaskFolderSource.from_layout(tmp_path, "train")
    tr = ImageTransform(size=64, augment=True, resize_scale=(256, 64))
    loader = APTLoader(src, APTConfig(), max_tokens=200, transform=tr, num_workers=0, packing="plan",
                       max_skip_fraction=0.5)
    keys = [k for batch, _ in loader for k in batch.keys]
    assert sorted(keys) == ["img000.png", "img002.png", "img003.png"]
    assert loader.stats.skipped == {"bad_mask": 1} and "img001.png" in loader.stats.skipped_keys
    strict = SamplePipeline(src, APTConfig(), tr, strict=True)
    with pytest.raises(ValueError, match=r"img001\.png \(mask\): mask is 10x10 \(WxH\), its image 120x160"):
        strict.try_load(1, 0, SkipLog())


def test_eval_batches_keep_original_masks(dense_root):
    src = MaskFolderSource.from_layout(dense_root, "val")
    tr = ImageTransform(size=64, resize_scale=(256, 64), keep_mask_size=True)
    loader = APTLoader(src, APTConfig(), max_tokens=400, transform=tr, num_workers=0, train=False)
    for batch, _ in loader:
        for b, key in enumerate(batch.keys):
            np.testing.assert_array_equal(batch.mask(b).numpy(), src.read_mask(src.keys.index(key)))
            assert min(batch.image_sizes[b]) == 64 and batch.mask_sizes[b] != batch.image_sizes[b]
