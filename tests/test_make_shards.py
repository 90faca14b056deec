"""Building shards (apt_data.shards.build, and its CLI tools/make_shards.py) on real photos: webdataset
compatibility, round trip, determinism, atomic + resumable writing under SIGKILL, bad sources."""
from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apt_data import APTConfig, decode_image, patchify, score_maps
from apt_data.shards import ShardDataError, ShardStats, iter_shards, read_index, read_sample
from apt_data.shards import build as ms
from conftest import IMAGE_PATHS

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "make_shards.py"

CLASSES = ["c0", "c1", "c2", "c3"]
ARGS = dict(image_size=224, shard_size=5, progress=False)  # 32 photos -> 7 shards


def make_source(root: Path) -> Path:
    """The 32 shipped ImageNet photos as an ImageNet-layout folder, 8 per class."""
    for i, p in enumerate(IMAGE_PATHS[:32]):
        d = root / CLASSES[i % 4]
        d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, d / p.name)
    return root


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if not p.name.endswith(".idx.json")}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def built(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    res = ms.build_shards(src, out, workers=1, **ARGS)
    return out, res


def test_layout_of_the_output(built):
    out, res = built
    assert (res.num_samples, res.num_shards, res.built, res.resumed) == (32, 7, 7, 0)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["classes.tsv", "train.parquet"] + [f"train-{i:06d}.tar{x}" for i in range(7) for x in ("", ".idx.json")])
    idx = read_index(out / "train.parquet")
    assert idx.config == APTConfig() and len(idx) == 32 and idx.settings["shards"] == [f"train-{i:06d}.tar" for i in range(7)]
    assert [c["class"] for c in idx.settings["classes"]] == CLASSES
    a = idx.arrays()
    assert np.bincount(a["label"]).tolist() == [8, 8, 8, 8]
    assert len(set(a["label"][:8])) > 1  # shuffled: shards mix classes


def test_webdataset_reads_make_shards_output(built):
    import webdataset as wds

    out, _ = built
    idx = read_index(out / "train.parquet")
    url = str(out / "train-{000000..000006}.tar")
    raw = list(wds.WebDataset(url, shardshuffle=False))
    assert [s["__key__"] for s in raw] == idx.column("key").tolist()
    for s, i in zip(raw, range(len(idx))):
        assert {"jpg", "cls", "json", "npy"} <= set(s)
        rec = idx.read_sample(i, strict=True)
        assert (s["jpg"], int(s["cls"]), json.loads(s["json"])) == (rec.jpeg, rec.label, rec.meta)
    decoded = next(iter(wds.WebDataset(url, shardshuffle=False).decode()))  # webdataset's own decoders
    rec = idx.read_sample(0, strict=True)
    assert decoded["cls"] == rec.label and decoded["json"] == rec.meta
    np.testing.assert_array_equal(decoded["npy"], rec.scores)


def test_round_trip_scores_tokens_and_sources(built, src):
    out, _ = built
    idx = read_index(out / "train.parquet")
    a = idx.arrays()
    stream = list(iter_shards(str(out / "train-{000000..000006}.tar"), strict=True))
    assert [r.key for r in stream] == a["key"].tolist()
    for i, rec in enumerate(stream):
        again = idx.read_sample(i, strict=True)
        assert (again.jpeg, again.label, again.meta) == (rec.jpeg, rec.label, rec.meta)
        np.testing.assert_array_equal(again.scores, rec.scores)
        source = src / rec.meta["source"]
        assert rec.label == CLASSES.index(source.parent.name) == a["label"][i]
        assert (a["orig_width"][i], a["orig_height"][i]) == Image.open(source).size
        img = decode_image(rec.jpeg)
        assert img.shape == (a["height"][i], a["width"][i], 3) == (224, 224, 3)
        want = decode_image(source, 224)
        assert 10 * np.log10(255**2 / ((img.astype(float) - want) ** 2).mean()) > 30  # the resized source
        for got, ref in zip(rec.score_maps(), score_maps(img, 16, 3)):
            np.testing.assert_allclose(got, ref, atol=1e-4)
        counts = patchify(img, idx.config).counts()
        assert [a[f"tokens_s{s}"][i] for s in range(3)] == counts.tolist() == rec.meta["tokens"]
        assert a["tokens"][i] == counts.sum()


def test_npy_members_load_without_pickle(built):
    out, _ = built
    n = 0
    for shard in sorted(out.glob("train-*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".npy"):
                    arr = np.load(io.BytesIO(tf.extractfile(m).read()), allow_pickle=False)
                    assert arr.dtype == np.float32 and arr.shape == (254,)
                    n += 1
    assert n == 32


def test_same_inputs_give_byte_identical_output_with_any_worker_count(built, src, tmp_path):
    out, _ = built
    res = ms.build_shards(src, tmp_path / "par", workers=2, **ARGS)
    assert res.built == 7
    assert files(tmp_path / "par") == files(out)


def test_killed_run_leaves_no_partial_tar_and_resumes(built, src, tmp_path):
    ref, _ = built
    out = tmp_path / "out"
    cmd = [sys.executable, str(TOOL), str(src), str(out), "--image-size", "224", "--shard-size", "5",
           "--workers", "1", "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60

    def writing_a_later_shard() -> bool:  # a shard after the first is half-written to its .tmp
        for p in out.glob("train-*.tar.tmp"):
            try:
                if p.name != "train-000000.tar.tmp" and p.stat().st_size > 0:
                    return True
            except FileNotFoundError:  # renamed meanwhile
                pass
        return False

    try:
        while not writing_a_later_shard():
            assert proc.poll() is None and time.monotonic() < deadline, "make_shards ended before it was killed"
            time.sleep(0.001)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    tars = sorted(p.name for p in out.glob("*.tar"))
    assert "train-000000.tar" in tars and len(tars) < 7 and not (out / "train.parquet").exists()
    for name in tars:  # every .tar there is complete: identical to the uninterrupted run's
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    rerun = subprocess.run(cmd, capture_output=True, text=True)  # the CLI resumes and summarises
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    m = re.search(r"make_shards: 32 samples in 7 shards \((\d+) built, (\d+) already complete\); kept 32, skipped 0",
                  rerun.stderr)
    assert m, rerun.stderr
    built, resumed = map(int, m.groups())
    assert resumed >= 1 and built == 7 - resumed
    assert not list(out.glob("*.tmp"))
    assert files(out) == files(ref)
    again = ms.build_shards(src, out, workers=1, **ARGS)  # nothing left to do
    assert (again.built, again.resumed) == (0, 7) and files(out) == files(ref)


def test_changed_settings_rebuild_stale_shards(built, src, tmp_path):
    ref, _ = built
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    cfg = APTConfig(thresholds=(6.5, 5.0))
    res = ms.build_shards(src, out, workers=1, cfg=cfg, **ARGS)
    assert res.built == 7
    idx = read_index(out / "train.parquet")
    assert idx.config == cfg
    old = read_index(ref / "train.parquet").column("tokens")
    assert (idx.column("tokens") <= old).all() and (idx.column("tokens") < old).any()
    for i in range(0, 32, 8):
        assert idx.token_counts()[i].tolist() == patchify(idx.read_sample(i).image(), cfg).counts().tolist()
    smaller = ms.build_shards(src, out, workers=1, limit_per_class=2, **ARGS)  # 8 samples: 2 shards
    assert smaller.num_shards == 2 and sorted(p.name for p in out.glob("train-*.tar")) == ["train-000000.tar", "train-000001.tar"]


def test_bad_sources_are_skipped_counted_and_summarised(src, tmp_path, caplog):
    bad_src = tmp_path / "src"
    shutil.copytree(src, bad_src)
    photo = (bad_src / "c1" / IMAGE_PATHS[1].name).read_bytes()
    (bad_src / "c1" / "truncated.JPEG").write_bytes(photo[: len(photo) // 2])
    (bad_src / "c2" / "empty.JPEG").write_bytes(b"")
    (bad_src / "c3" / "text.JPEG").write_text("not an image\n")
    (bad_src / "c3" / "readme.txt").write_text("not an image file name: not listed\n")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="apt_data.shards.build"):
        res = ms.build_shards(bad_src, out, shard_size=5, workers=1, progress=False)
    summary = res.summary()
    assert res.num_samples == 32 and summary.startswith("32 samples in 7 shards")
    assert "skipped 3 (corrupt_image=1, empty_file=1, not_an_image=1)" in summary
    for name, reason in [("c1/truncated.JPEG", "corrupt_image"), ("c2/empty.JPEG", "empty_file"),
                         ("c3/text.JPEG", "not_an_image")]:
        assert any(name in r.getMessage() and reason in r.getMessage() for r in caplog.records), name
    idx = read_index(out / "train.parquet")
    assert len(idx) == 32 and not {"c1/truncated.JPEG", "c2/empty.JPEG", "c3/text.JPEG"} & set(idx.column("source"))
    stats = ShardStats()
    assert len(list(iter_shards([str(p) for p in idx.shard_paths()], stats=stats))) == 32 and stats.num_skipped == 0
    # strict stops at the first bad source with an error naming it
    bad_names = ("c1/truncated.JPEG", "c2/empty.JPEG", "c3/text.JPEG")
    with pytest.raises(ShardDataError) as e:
        ms.build_shards(bad_src, tmp_path / "strict", shard_size=5, workers=2, progress=False, strict=True)
    assert e.value.shard in bad_names and e.value.reason in ("corrupt_image", "empty_file", "not_an_image")
    assert not (tmp_path / "strict" / "train.parquet").exists()


def test_selection_per_class_is_seeded_and_disjoint(src):
    a, classes = ms.plan_samples(src, limit_per_class=3, skip_per_class=0, seed=0, shuffle=True)
    b, _ = ms.plan_samples(src, limit_per_class=2, skip_per_class=3, seed=0, shuffle=True)
    c, _ = ms.plan_samples(src, limit_per_class=3, skip_per_class=0, seed=1, shuffle=True)
    assert classes == dict(enumerate(CLASSES))
    assert np.bincount([s[3] for s in a]).tolist() == [3] * 4 and np.bincount([s[3] for s in b]).tolist() == [2] * 4
    assert not {s[1] for s in a} & {s[1] for s in b}
    assert a == ms.plan_samples(src, limit_per_class=3, skip_per_class=0, seed=0, shuffle=True)[0]
    assert {s[1] for s in a} != {s[1] for s in c}
    assert len({s[2] for s in a + b}) == 20  # unique keys


def test_file_list_source_with_keep_aspect(tmp_path):
    lst = tmp_path / "list.tsv"
    paths = IMAGE_PATHS[:6]
    lst.write_text("".join(f"{p}\t{100 + i}\tthing{i}\n" for i, p in enumerate(paths)))
    res = ms.build_shards(lst, tmp_path / "out", image_size=128, shard_size=4, crop=False, workers=1,
                         prefix="val", shuffle=False, progress=False)
    assert res.num_samples == 6 and res.index_path.name == "val.parquet"
    idx = read_index(res.index_path)
    assert idx.settings["crop"] is False
    a = idx.arrays()
    assert a["label"].tolist() == [100 + i for i in range(6)]
    for i, p in enumerate(paths):
        w, h = Image.open(p).size
        sw, sh = a["width"][i], a["height"][i]
        assert sw % 16 == 0 and sh % 16 == 0 and min(sw, sh) == 128
        assert abs(sw / sh - w / h) < 0.15  # aspect kept (sides rounded to 16)
        rec = read_sample(idx.row(i), idx.root, strict=True)
        assert rec.meta["class"] == f"thing{i}" and decode_image(rec.jpeg).shape == (sh, sw, 3)
        assert idx.token_counts()[i].tolist() == patchify(rec.image(), idx.config).counts().tolist()


def test_three_parts_then_merge_equal_one_build(built, src, tmp_path):
    """--part K --num-parts 3 on three "machines" (separate folders), copied together, then --merge:
    byte-identical to the one-machine build; merging with a part missing names the missing shards."""
    ref, _ = built
    parts = [ms.build_shards(src, tmp_path / f"m{k}", workers=1, part=k, num_parts=3, **ARGS) for k in (2, 0, 1)]
    assert [p.num_shards for p in parts] == [2, 3, 2] and sum(p.num_samples for p in parts) == 32
    assert all(p.index_path is None and "merge the parts" in p.summary() for p in parts)
    names = [sorted(f.name for f in (tmp_path / f"m{k}").glob("*.tar")) for k in range(3)]
    assert names[0] == ["train-000000.tar", "train-000003.tar", "train-000006.tar"]
    assert not set(names[0]) & set(names[1]) and not set(names[1]) & set(names[2])  # disjoint
    out = tmp_path / "merged"
    out.mkdir()
    for k in (0, 1):
        for f in (tmp_path / f"m{k}").iterdir():
            shutil.copy2(f, out / f.name)
    with pytest.raises(ValueError, match=r"2 of 7 shards are missing .*train-000002.tar, train-000005.tar"):
        ms.build_shards(src, out, workers=1, merge=True, **ARGS)
    for f in (tmp_path / "m2").iterdir():
        shutil.copy2(f, out / f.name)
    res = ms.build_shards(src, out, workers=1, merge=True, **ARGS)
    assert (res.built, res.resumed, res.num_samples) == (0, 7, 32)
    assert files(out) == files(ref)


def test_cli_help_shows_defaults_and_a_part_run_summarises_once(src, tmp_path):
    out = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "(default: 100)" in out.stdout and "--num-parts" in out.stdout
    run = subprocess.run([sys.executable, str(TOOL), str(src), str(tmp_path / "o"), "--shard-size", "5",
                          "--workers", "1", "--part", "1", "--num-parts", "3"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stderr.count("samples in 2 shards") == 1 and "samples in" not in run.stdout  # summary once
    assert "img/s" not in run.stderr and "|" not in run.stderr  # no progress bar outside a terminal
    assert sorted(p.name for p in (tmp_path / "o").glob("*.tar")) == ["train-000001.tar", "train-000004.tar"]


def test_exif_orientation_is_applied_by_the_build_only_on_request(tmp_path):
    """``build_shards(..., exif_transpose=True)`` (``--exif-transpose``) stores photos upright; the
    default stores them as encoded, as timm reads them."""
    from PIL import Image

    from apt_data import decode_image, read_index
    from apt_data.shards import read_sample
    from apt_data.shards.build import build_shards
    from conftest import IMAGE_PATHS

    src = tmp_path / "src" / "c0"
    src.mkdir(parents=True)
    with Image.open(IMAGE_PATHS[2]) as im:
        small = im.convert("RGB").resize((96, 64), Image.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: 64 wide, 96 high
    small.save(src / "rotated.jpg", quality=95, exif=exif.tobytes())
    shapes = {}
    for flag in (False, True):
        out = tmp_path / f"out{flag}"
        build_shards(tmp_path / "src", out, image_size=32, crop=False, workers=1, progress=False,
                     exif_transpose=flag)
        index = read_index(out)
        rec = read_sample(index.table.to_pylist()[0], out)
        shapes[flag] = decode_image(rec.jpeg).shape
        assert index.settings.get("exif_transpose", False) is flag
    assert shapes == {False: (32, 48, 3), True: (48, 32, 3)}
