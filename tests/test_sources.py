"""Loader sources: a map-style dataset (torchvision ImageFolder, Hugging Face-style dict items, arrays)
through `open_source` and `APTLoader`, down to a few optimizer steps of an APT ViT."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apt_data import APTConfig, patchify
from apt_data.loader import APTLoader
from apt_data.sources import DatasetSource, FolderSource, IndexSource, open_source
from apt_data.transforms import ImageTransform
from conftest import IMAGE_PATHS

SHARDS = Path(__file__).resolve().parents[1] / "shards"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """A tiny ImageNet-layout folder of 12 real photos, 3 classes."""
    root = tmp_path_factory.mktemp("imagefolder")
    for k, p in enumerate(IMAGE_PATHS[:12]):
        d = root / f"class{k % 3}"
        d.mkdir(exist_ok=True)
        shutil.copy(p, d / p.name)
    return root


def test_open_source_recognises_paths_sources_and_datasets(image_folder):
    from torchvision.datasets import ImageFolder

    assert isinstance(open_source(f"{SHARDS}:val"), IndexSource)
    folder = open_source(image_folder)
    assert isinstance(folder, FolderSource) and open_source(folder) is folder
    ds = open_source(ImageFolder(str(image_folder)))
    assert isinstance(ds, DatasetSource)
    # the same images, labels and names as the folder source (ImageFolder's targets, no image loaded)
    assert ds.keys == folder.keys and ds.labels.tolist() == folder.labels.tolist()
    with pytest.raises(TypeError, match="map-style dataset"):
        open_source(3.5)


def test_transform_takes_pil_images_arrays_and_bytes_alike():
    arr = np.asarray(Image.open(IMAGE_PATHS[0]).convert("RGB"))
    png = io.BytesIO()
    Image.fromarray(arr).save(png, "PNG")
    for tr in (ImageTransform(size=224), ImageTransform(size=224, keep_aspect=True),
               ImageTransform(size=224, augment=True, re_prob=0.5)):
        want = tr(png.getvalue(), seed=3)
        assert np.array_equal(tr(arr, seed=3), want) and np.array_equal(tr(Image.fromarray(arr), seed=3), want)
    gray = arr[:, :, 0]
    assert np.array_equal(ImageTransform(size=224)(gray), ImageTransform(size=224)(Image.fromarray(gray)))
    with pytest.raises(ValueError, match="uint8"):
        ImageTransform(size=224)(arr.astype(np.float32))
    with pytest.raises(TypeError, match="cannot transform"):
        ImageTransform(size=224)(torch.zeros(3, 224, 224))


def test_dict_items_and_arrays_load_like_the_folder(image_folder):
    """Hugging Face-style items ({"image": ..., "label": ...}) with arrays, PIL images or bytes give the
    batches of the same images read from files."""
    folder = FolderSource(image_folder)
    kinds = [lambda p: np.asarray(Image.open(p).convert("RGB")), lambda p: Image.open(p), lambda p: p.read_bytes()]
    items = [{"image": kinds[i % 3](p), "label": int(label)} for i, (p, label) in enumerate(zip(folder.paths, folder.labels))]
    src = DatasetSource(items, keys=folder.keys)
    assert src.labels.tolist() == folder.labels.tolist()
    # decoded images are not drafted at a reduced JPEG scale: compare with full decodes of the files
    tr = ImageTransform(size=224)
    for i in range(len(src)):
        assert np.array_equal(tr(src.read(i)), tr(np.asarray(Image.open(folder.paths[i]).convert("RGB"))))
    kw = dict(max_tokens=700, seed=2, packing="plan")
    got = [(b.keys, b.labels.tolist()) for b, _ in APTLoader(src, APTConfig(), num_workers=2, **kw)]
    want = [(b.keys, b.labels.tolist()) for b, _ in APTLoader(src, APTConfig(), num_workers=0, **kw)]
    assert got == want and sorted(k for keys, _ in got for k in keys) == sorted(folder.keys)
    with pytest.raises(TypeError, match="image_key"):
        DatasetSource([{"pixels": 1, "y": 0}])
    assert DatasetSource([{"pixels": items[0]["image"], "y": 4}], image_key="pixels", label_key="y").labels.tolist() == [4]


def test_imagefolder_trains_a_few_steps(image_folder):
    """A torchvision ImageFolder, wrapped, feeds an APT ViT (random init) for three optimizer steps."""
    from torchvision.datasets import ImageFolder

    from apt_model import from_timm

    cfg = APTConfig()
    tr = ImageTransform(size=224, augment=True)
    loader = APTLoader(ImageFolder(str(image_folder)), cfg, max_tokens=800, num_workers=0, transform=tr, seed=0)
    assert isinstance(loader.source, DatasetSource) and not loader.exact_counts
    torch.manual_seed(0)
    model = from_timm("vit_tiny_patch16_224", num_classes=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    steps, seen = 0, 0
    for batch, targets in (bt for _ in range(3) for bt in loader):  # a streamed epoch may be short
        assert batch.num_images > 0 and batch.seq_len <= 800 and batch.pixels[0].shape[0] > 0
        loss = torch.nn.functional.cross_entropy(model(batch), targets)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps, seen = steps + 1, seen + batch.num_images
        if steps == 3:
            break
    assert steps == 3 and seen >= 3 and loader.stats.num_skipped == 0


def test_layout_fn_replaces_patchify(image_folder):
    """``layout_fn(image, cfg, index)`` gives each image's layout; here the uniform grid of base cells."""
    def grid(image, cfg, index):
        return patchify(image, APTConfig(thresholds=(float("-inf"),) * (cfg.num_scales - 1)))

    src = FolderSource(image_folder)
    loader = APTLoader(src, APTConfig(), max_tokens=1200, num_workers=0, layout_fn=grid, packing="plan")
    for batch, _ in loader:
        assert all(p.shape[0] == 0 for p in batch.pixels[1:]) and set(batch.seqlens) == {197}
    other = APTLoader(src, APTConfig(), max_tokens=1200, num_workers=0, packing="plan").with_layout_fn(grid)
    assert [b.keys for b, _ in other] == [b.keys for b, _ in loader]
