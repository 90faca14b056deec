"""Segmentation masks in shards: written by make_shards (``<key>.seg.png``, in the index with its
CRC32C), indexed in place by index_shards, read back aligned with their images; a flipped byte in a
mask is a counted skip. On the repository's photos with masks made from their colour ranges."""
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from apt_data import APTConfig
from apt_data.loader import APTLoader
from apt_data.masks import MaskLabels, decode_mask, encode_mask
from apt_data.shards import ShardDataError, ShardStats, iter_shard, read_index
from apt_data.shards.build import build_shards
from apt_data.shards.inplace import index_webdataset
from apt_data.sources import MaskFolderSource, open_shards
from apt_data.transforms import ImageTransform
from conftest import IMAGE_PATHS, load_resized
from test_dense_data import classes_of, write_pairs

CFG = APTConfig(patch_size=16, num_scales=2, thresholds=(5.5,))


@pytest.fixture(scope="module")
def mask_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    write_pairs(root, "train", 8)
    out = root / "shards"
    res = build_shards(root / "images" / "train", out, masks=root / "annotations" / "train", image_size=64,
                       crop=False, shard_size=3, cfg=CFG, workers=1, progress=False, validate=True)
    assert res.num_samples == 8 and res.num_shards == 3 and res.stats.num_skipped == 0
    return root, out


def _flip(path, pos: int) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([b ^ 0x20]))


def test_make_shards_stores_aligned_masks(mask_shards):
    root, out = mask_shards
    index = read_index(out)
    assert {"seg_offset", "seg_size", "seg_crc32c"} <= set(index.table.column_names)
    assert index.settings["masks"]["member"] == "seg.png" and not index.settings["crop"]
    src = open_shards(str(out))
    folder = MaskFolderSource.from_layout(root, "train")
    assert src.has_masks and len(src) == 8
    for i in range(len(src)):
        jpeg, png = src.read_with_mask(i)
        image, mask = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")), decode_mask(png)
        assert mask.shape == image.shape[:2] and min(mask.shape) == 64
        # the source mask resized nearest over the whole frame, as its image was resized
        k = folder.keys.index(index.row(i)["source"])
        full = folder.read_mask(k)
        ref = np.asarray(Image.fromarray(full).resize(mask.shape[::-1], Image.NEAREST))
        np.testing.assert_array_equal(mask, ref)
        good = (classes_of(image) == mask).mean()
        assert good > 0.6 and good > (classes_of(image) == np.roll(mask, 5, axis=1)).mean() + 0.1
    # the sequential reader gives the mask too (validate: decoded, its image's size)
    recs = list(iter_shard(out / "train-000000.tar", strict=True, validate=True))
    assert len(recs) == 3 and all(r.mask is not None and r.mask.startswith(b"\x89PNG") for r in recs)
    # plain webdataset reads them: the mask is decoded as a PNG by its last extension
    import webdataset as wds

    by_key = {r.key: r for r in recs}
    for sample in wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False).decode("l8"):
        np.testing.assert_array_equal(sample["seg.png"], decode_mask(by_key[sample["__key__"]].mask))
        # shards without masks keep their index columns (no seg_*)
    assert "seg_offset" not in read_index(IMAGE_PATHS[0].parents[3] / "shards").table.column_names


def test_mask_shards_feed_the_loader(mask_shards):
    _, out = mask_shards
    tr = ImageTransform(size=64, augment=True, resize_scale=(256, 64), cat_max_ratio=0.75, photometric=True)
    loader = APTLoader(str(out), CFG, max_tokens=64, transform=tr, num_workers=0, steps_per_epoch=3)
    n = 0
    for batch, _ in loader:
        assert batch.mask_sizes == batch.image_sizes == ((64, 64),) * batch.num_images
        n += batch.num_images
    assert n >= 3


def test_a_flipped_byte_in_a_mask_is_a_counted_skip(mask_shards, tmp_path):
    import shutil

    _, out = mask_shards
    copy = tmp_path / "shards"
    shutil.copytree(out, copy)
    src = open_shards(str(copy))
    row = src.row(1)
    _flip(copy / row["shard"], row["seg_offset"] + row["seg_size"] // 2)
    with pytest.raises(ShardDataError, match=r"checksum mismatch in the \.seg\.png member") as e:
        src.read_with_mask(1)
    assert e.value.reason == "checksum_mismatch" and e.value.key == src.keys[1]
    src.read_with_mask(0)  # the others read
    tr = ImageTransform(size=64, resize_scale=(256, 64))
    loader = APTLoader(str(copy), CFG, max_tokens=400, transform=tr, num_workers=0, packing="stream",
                       max_skip_fraction=0.5, shuffle=False)
    keys = [k for batch, _ in loader for k in batch.keys]
    assert len(keys) == 7 and src.keys[1] not in keys
    assert loader.stats.skipped["checksum_mismatch"] == 1
    # a cut-off mask in a tar read without an index: counted as a corrupt mask
    stats = ShardStats()
    data = bytearray((copy / "train-000000.tar").read_bytes())
    first = read_index(copy).row(0)
    data[first["seg_offset"] + first["seg_size"] - 12:first["seg_offset"] + first["seg_size"]] = b"\0" * 12
    (tmp_path / "cut.tar").write_bytes(bytes(data))
    assert len(list(iter_shard(tmp_path / "cut.tar", stats=stats))) == 2
    assert stats.skipped["corrupt_mask"] == 1


def test_make_shards_with_masks_errors(tmp_path):
    write_pairs(tmp_path, "train", 3)
    images, masks = tmp_path / "images" / "train", tmp_path / "annotations" / "train"
    with pytest.raises(ValueError, match="crop=False"):
        build_shards(images, tmp_path / "out", masks=masks, image_size=64, progress=False)
    (masks / "img001.png").write_bytes(encode_mask(np.zeros((7, 9), np.uint8)))  # not its image's size
    res = build_shards(images, tmp_path / "out", masks=masks, image_size=64, crop=False, workers=1,
                       progress=False, mask_labels=MaskLabels(void=(0,)))
    assert res.num_samples == 2 and res.stats.skipped["bad_mask"] == 1
    assert "img001.png" in res.stats.events[0].detail
    src = open_shards(str(tmp_path / "out"))
    assert all(0 not in np.unique(decode_mask(src.read_mask(i))) for i in range(len(src)))  # void -> 255
    (masks / "img002.png").unlink()
    with pytest.raises(ValueError, match="img002.png: no mask"):
        build_shards(images, tmp_path / "out2", masks=masks, image_size=64, crop=False, progress=False)


def _tar(path, samples) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_index_shards_takes_mask_members(tmp_path):
    samples = []
    for k in range(4):
        photo = load_resized(IMAGE_PATHS[k], (48, 64))
        buf = io.BytesIO()
        Image.fromarray(photo).save(buf, "JPEG", quality=95)
        mask = np.zeros((48, 63 if k == 2 else 64), np.uint8) + k
        samples.append((f"s{k}", {"cls": b"0", "jpg": buf.getvalue(), "seg.png": encode_mask(mask)}))
    _tar(tmp_path / "a.tar", samples)
    res = index_webdataset(tmp_path / "a.tar", tmp_path / "a.parquet", cfg=CFG, image_size=32, crop=False,
                           workers=1)
    assert res.num_samples == 3 and res.stats.skipped["bad_mask"] == 1
    assert "seg.png is 63x48, its image 64x48" in res.stats.events[0].detail
    src = open_shards(str(tmp_path / "a.parquet"))
    assert src.has_masks and src.keys == ["s0", "s1", "s3"]
    for i, k in enumerate((0, 1, 3)):
        assert (decode_mask(src.read_mask(i)) == k).all()
    row = src.row(2)
    _flip(tmp_path / "a.tar", row["seg_offset"] + 40)
    with pytest.raises(ShardDataError, match="checksum mismatch"):
        src.read_with_mask(2)


def test_make_shards_command_takes_masks(mask_shards, tmp_path):
    """``apt-make-shards SRC OUT --masks DIR`` stores the same masks as `build_shards(masks=...)` (keeping the
    aspect without being told), and --void maps the stored ids once, at build time."""
    from apt_train.commands import make_shards

    root, lib = mask_shards
    src, masks = root / "images" / "train", root / "annotations" / "train"
    flags = ["--image-size", "64", "--shard-size", "3", "--patch-size", "16", "--num-scales", "2", "--thresholds",
             "5.5", "--workers", "1", "--quiet"]
    assert make_shards.main([str(src), str(tmp_path / "cli"), "--masks", str(masks), *flags]) == 0
    cli, ref = read_index(tmp_path / "cli"), read_index(lib)
    assert not cli.settings["crop"] and cli.settings["masks"] == ref.settings["masks"]
    assert cli.table.column("seg_crc32c").to_pylist() == ref.table.column("seg_crc32c").to_pylist()

    void = int(np.unique(decode_mask(open_shards(str(lib)).read_with_mask(0)[1]))[0])
    assert make_shards.main([str(src), str(tmp_path / "void"), "--masks", str(masks), "--void", str(void), *flags]) == 0
    src_void = open_shards(str(tmp_path / "void"))
    assert read_index(tmp_path / "void").settings["masks"]["labels"]["void"] == [void]
    assert not (decode_mask(src_void.read_with_mask(0)[1]) == void).any()
    with pytest.raises(SystemExit) as e:  # a flag error: argparse's usage and status 2
        make_shards.main([str(src), str(tmp_path / "x"), "--void", "3", *flags])
    assert e.value.code == 2
