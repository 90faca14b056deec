"""APTLoader: exactly-once epochs, determinism, resume, bad data, batches equal to per-image packing."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from apt_data import APTConfig, patchify
from apt_data.loader import APTLoader, FolderSource
from apt_data.packing import pack_images
from apt_data.transforms import ImageTransform
from conftest import IMAGE_PATHS


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An ImageNet-layout folder of the real test photos, 3 classes."""
    root = tmp_path_factory.mktemp("folder")
    for k, p in enumerate(IMAGE_PATHS):
        d = root / f"class{k % 3}"
        d.mkdir(exist_ok=True)
        shutil.copy(p, d / p.name)
    return root


def keys_of_epoch(loader):
    out = []
    for batch, targets in loader:
        assert batch.seq_len <= loader.max_tokens
        assert torch.equal(targets, batch.labels)
        out.append(list(batch.keys))
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_every_sample_exactly_once_per_epoch(folder, workers):
    src = FolderSource(folder)
    loader = APTLoader(src, APTConfig(), max_tokens=1200, num_workers=workers, image_size=224, seed=1)
    batches = keys_of_epoch(loader)
    assert len(batches) == len(loader)
    flat = [k for b in batches for k in b]
    assert sorted(flat) == sorted(src.keys)
    # labels follow the class folders
    for batch, _ in APTLoader(src, APTConfig(), max_tokens=1200, num_workers=0, image_size=224):
        for key, label in zip(batch.keys, batch.labels.tolist()):
            assert key.startswith(f"class{label}/")


def test_epochs_are_deterministic_and_resumable(folder):
    mk = lambda: APTLoader(FolderSource(folder), APTConfig(), max_tokens=1000, num_workers=0, seed=7)  # noqa: E731
    a, b = mk(), mk()
    ea, eb = keys_of_epoch(a), keys_of_epoch(b)
    assert ea == eb
    b.set_epoch(1)
    assert keys_of_epoch(b) != ea  # reshuffled
    c = mk()
    c.resume(epoch=0, step=3)
    assert len(c) == len(ea) - 3
    assert keys_of_epoch(c) == ea[3:]
    assert len(c) == len(ea)  # the next pass starts the epoch from its beginning again


def test_batches_equal_per_image_packing(folder):
    cfg = APTConfig()
    tr = ImageTransform(size=224)
    src = FolderSource(folder)
    loader = APTLoader(src, cfg, max_tokens=1500, num_workers=0, transform=tr, num_prefix_tokens=1)
    seen = 0
    for batch, _ in loader:
        for b, key in enumerate(batch.keys):
            i = src.keys.index(key)
            img = tr(src.read(i), key)
            single = pack_images([img], cfg, labels=[int(src.labels[i])], num_prefix_tokens=1)
            for s in range(cfg.num_scales):
                mine = batch.coords[s][:, 0] == b
                np.testing.assert_array_equal(batch.pixels[s][mine].numpy(), single.pixels[s].numpy())
                np.testing.assert_array_equal(batch.coords[s][mine][:, 1:].numpy(), single.coords[s][:, 1:].numpy())
            assert len(patchify(img, cfg)) + 1 == batch.seqlens[b]
            seen += 1
    assert seen == len(src)


def test_static_shapes_pad_every_batch(folder):
    loader = APTLoader(FolderSource(folder), APTConfig(), max_tokens=900, num_workers=0, static_shapes=True)
    for batch, _ in loader:
        assert batch.seq_len == 900
        assert batch.num_padding == 900 - batch.num_real_tokens


def test_bad_files_are_logged_counted_and_skipped(folder, tmp_path, caplog):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "class0" / "zero.jpg").write_bytes(b"")
    (bad / "class1" / "text.jpg").write_text("not an image at all")
    (bad / "class2" / "cut.jpg").write_bytes(IMAGE_PATHS[0].read_bytes()[:3000])
    src = FolderSource(bad)
    loader = APTLoader(src, APTConfig(), max_tokens=1200, num_workers=0)
    flat = [k for b in keys_of_epoch(loader) for k in b]
    assert sorted(flat) == sorted(k for k in src.keys if Path(k).stem not in ("zero", "text", "cut"))
    assert loader.stats.num_skipped == 3
    assert sorted(loader.stats.skipped_keys) == ["class0/zero.jpg", "class1/text.jpg", "class2/cut.jpg"]
    assert "class1/text.jpg" in caplog.text
    strict = APTLoader(src, APTConfig(), max_tokens=1200, num_workers=0, strict=True, shuffle=False)
    with pytest.raises(ValueError, match=r"class0/zero\.jpg"):
        keys_of_epoch(strict)


def test_budget_errors(folder):
    with pytest.raises(ValueError, match="cannot hold a single image"):
        APTLoader(FolderSource(folder), APTConfig(), max_tokens=3, num_workers=0)
    loader = APTLoader(FolderSource(folder), APTConfig(), max_tokens=150, num_workers=0)
    with pytest.raises(ValueError, match=r"needs 197 tokens, more than the batch budget max_tokens=150"):
        len(loader)


def test_ranks_split_the_epoch(folder):
    src = FolderSource(folder)
    per_rank = []
    for r in range(3):
        loader = APTLoader(src, APTConfig(), max_tokens=700, num_workers=0, rank=r, world_size=3, seed=3)
        per_rank.append(keys_of_epoch(loader))
    assert len({len(b) for b in per_rank}) == 1
    flat = [k for rank in per_rank for b in rank for k in b]
    assert sorted(flat) == sorted(src.keys)


def test_augmented_training_is_seeded_per_sample(folder):
    tr = ImageTransform(size=224, augment=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5)
    a = APTLoader(FolderSource(folder), APTConfig(), max_tokens=1200, num_workers=2, transform=tr, seed=5)
    b = APTLoader(FolderSource(folder), APTConfig(), max_tokens=1200, num_workers=0, transform=tr, seed=5)
    for (ba, _), (bb, _) in zip(a, b):
        assert ba.keys == bb.keys
        for s in range(3):
            assert torch.equal(ba.pixels[s], bb.pixels[s])
