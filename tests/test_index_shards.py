"""Plain webdataset shards (written by `webdataset.ShardWriter`) indexed in place by
`apt_data.shards.inplace` / tools/index_shards.py, then read by APTLoader from the original tars."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apt_data import APTConfig, patchify
from apt_data.loader import APTLoader
from apt_data.shards import iter_shard, read_index
from apt_data.shards.inplace import index_webdataset
from apt_data.sources import open_source
from apt_data.transforms import ImageTransform
from conftest import IMAGE_PATHS

ROOT = Path(__file__).resolve().parents[1]
try:  # Pillow-SIMD may be built without WebP
    from PIL import features

    WEBP = features.check("webp")
except Exception:  # pragma: no cover
    WEBP = False
FORMATS = [("jpg", "JPEG"), ("jpeg", "JPEG"), ("png", "PNG"), ("webp", "WEBP") if WEBP else ("png", "PNG"),
           ("jpg", "JPEG")]


def make_webdataset(out: Path, label_in_json: bool = False) -> dict:
    """Tars written by webdataset.ShardWriter: 32 photos x 5 variants (sizes, crops, formats), with
    .cls (or a json label), .json and .txt members. Returns {key: (label, image bytes, ext)}."""
    import webdataset as wds

    rng = np.random.default_rng(0)
    samples = {}
    with wds.ShardWriter(str(out / "data-%06d.tar"), maxcount=40, verbose=0) as sink:
        for p, path in enumerate(IMAGE_PATHS):
            with Image.open(path) as im:
                im = im.convert("RGB")
                for v, (ext, fmt) in enumerate(FORMATS):
                    w, h = im.size
                    s = rng.uniform(0.4, 1.0)
                    crop = im.crop((0, 0, max(32, int(w * s)), max(32, int(h * rng.uniform(0.4, 1.0)))))
                    buf = io.BytesIO()
                    crop.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
                    key, label = f"p{p:03d}v{v}", p % 10
                    sample = {"__key__": key, ext: buf.getvalue(), "txt": f"photo {path.stem}",
                              "json": {"label": label, "source": path.name} if label_in_json else {"source": path.name}}
                    if not label_in_json:
                        sample["cls"] = label
                    sink.write(sample)
                    samples[key] = (label, buf.getvalue(), ext)
    return samples


def fill_of(batches, budget: int, workers: int) -> float:
    """Real tokens / budget over the batches, leaving out at most one partial batch per worker."""
    fills = sorted(sum(b) / budget for b in batches)
    return float(np.mean(fills[workers:]))


@pytest.mark.parametrize("label_in_json", [False, True])
def test_loader_reads_original_tars_with_exact_counts(tmp_path, label_in_json):
    samples = make_webdataset(tmp_path, label_in_json)
    tars = sorted(tmp_path.glob("data-*.tar"))
    assert len(tars) == 4
    before = {t: t.read_bytes() for t in tars}
    res = index_webdataset(str(tmp_path / "data-{000000..000003}.tar"), tmp_path / "train.parquet",
                           label_field="label" if label_in_json else None, workers=2)
    assert res.num_samples == 160 and res.stats.num_skipped == 0
    assert all(t.read_bytes() == before[t] for t in tars)  # in place: nothing rewritten

    idx = read_index(tmp_path / "train.parquet")
    src = open_source(str(tmp_path))
    transform = ImageTransform(size=224, multiple=16)
    for i in (0, 2, 3, 7, 159):  # the index's counts are patchify's at the loader's transform
        label, data, ext = samples[src.keys[i]]
        assert src.read(i) == data and src.labels[i] == label
        assert len(patchify(transform(data), APTConfig())) == idx.column("tokens")[i]
        assert idx.row(i)["image_ext"] == ext
        assert idx.read_sample(i, strict=True).jpeg == data  # read_sample too

    budget = 2048
    loader = APTLoader(str(tmp_path / "train.parquet"), APTConfig(), max_tokens=budget, num_workers=2,
                       train=False, packing="plan", seed=0, strict=True)
    assert loader._exact is not None  # planned from the index's exact counts
    keys, tokens = [], []
    for batch, targets in loader:
        keys += list(batch.keys)
        tokens.append(batch.seqlens)
        assert [samples[k][0] for k in batch.keys] == targets.tolist()
    assert sorted(keys) == sorted(samples) and len(keys) == 160
    assert loader.stats.num_skipped == 0
    fill = fill_of(tokens, budget, 2)
    assert fill >= 0.99, fill


def test_index_shards_tool(tmp_path):
    make_webdataset(tmp_path)
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "index_shards.py"), str(tmp_path / "data-{000000..000003}.tar"),
                        "--out", str(tmp_path / "train.parquet"), "--workers", "1", "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "160 samples in 4 shards" in r.stderr
    meta = json.loads(read_index(tmp_path / "train.parquet").table.schema.metadata[b"apt.shards"])
    assert meta["shards"] == [f"data-{k:06d}.tar" for k in range(4)]


def test_a_tar_cut_inside_a_sample_keeps_the_samples_before_it(tmp_path):
    """A tar cut inside a sample's first member: the complete samples before it are indexed (as `iter_shard`
    streams them), the cut one is counted as corrupt_tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, path in enumerate(IMAGE_PATHS[:3]):
            for ext, data in (("cls", f"{i}      ".encode()), ("jpg", path.read_bytes())):
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    (tmp_path / "cut.tar").write_bytes(raw[:raw.index(b"s2.cls") + 512 + 3])  # 3 bytes into s2's .cls data
    res = index_webdataset(tmp_path / "cut.tar", tmp_path / "cut.parquet", workers=1)
    assert read_index(tmp_path / "cut.parquet").column("key").tolist() == ["s0", "s1"]
    assert [(e.key, e.reason) for e in res.stats.events] == [("s2", "corrupt_tar")]
    assert [r.key for r in iter_shard(tmp_path / "cut.tar")] == ["s0", "s1"]
