"""Shard format and readers (apt_data.shards): bad data, truncation, atomic writes, the committed set."""
from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apt_data import APTConfig, decode_image, patchify, score_maps
from apt_data.shards import (
    ShardDataError, ShardStats, ShardWriter, encode_sample, expand_urls, iter_shard, iter_shards,
    list_image_folder, read_file_list, read_index, read_sample, sample_meta)
from conftest import IMAGE_PATHS

ROOT = Path(__file__).resolve().parents[1]
SHARDS = ROOT / "shards"
CFG = APTConfig()


@pytest.fixture(scope="module")
def encoded():
    """Six real photos stored as make_shards stores them (224 px, centre crop)."""
    out = []
    for i, p in enumerate(IMAGE_PATHS[:6]):
        key = f"good{i}"
        enc = encode_sample(p, CFG, 224, name=p.name)
        out.append((key, enc, sample_meta(key, enc, CFG, label=i, source=p.name, crop=True, quality=95)))
    return out


def good_members(enc, meta, label) -> dict:
    buf = io.BytesIO()
    np.save(buf, enc.scores, allow_pickle=False)
    return {"cls": str(label).encode(), "jpg": enc.jpeg, "json": json.dumps(meta).encode(), "npy": buf.getvalue()}


def bad_members(kind: str, enc, meta) -> dict:
    m = good_members(enc, meta, 7)
    if kind == "corrupt_jpeg":
        m["jpg"] = enc.jpeg[: len(enc.jpeg) // 2]        # truncated JPEG
    elif kind == "empty_image":
        m["jpg"] = b""                                   # zero-byte member
    elif kind == "not_jpeg":
        m["jpg"] = b"this is a text file, not an image\n"  # non-image member
    elif kind == "missing_label":
        del m["cls"]
    elif kind == "bad_label":
        m["cls"] = b"seven"
    elif kind == "bad_scores":
        m["npy"] = m["npy"][:100]
    return m


BAD_KINDS = ["corrupt_jpeg", "empty_image", "not_jpeg", "missing_label", "bad_label", "bad_scores"]


def write_shard(path: Path, samples: list[tuple[str, dict]]) -> list[dict]:
    """Write raw members with ShardWriter; returns index-style rows (shard, key, label, offsets)."""
    rows = []
    with ShardWriter(path) as w:
        for key, members in samples:
            offs = w.write(key, members)
            row = {"shard": path.name, "key": key}
            if "cls" in members and members["cls"].isdigit():
                row["label"] = int(members["cls"])
            for ext, (o, s) in offs.items():
                row[f"{ext}_offset"], row[f"{ext}_size"] = o, s
            rows.append(row)
    return rows


@pytest.fixture
def mixed_shard(tmp_path, encoded):
    """good0, then each bad kind, interleaved with good1..good3."""
    samples = [(encoded[0][0], good_members(encoded[0][1], encoded[0][2], 0))]
    for i, kind in enumerate(BAD_KINDS):
        samples.append((f"bad_{kind}", bad_members(kind, encoded[4][1], encoded[4][2])))
        if i % 2:
            k, e, m = encoded[1 + i // 2]
            samples.append((k, good_members(e, m, 1 + i // 2)))
    path = tmp_path / "mixed-000000.tar"
    return path, write_shard(path, samples)


def test_iter_shard_skips_bad_samples_logs_and_counts(mixed_shard, encoded, caplog):
    path, _ = mixed_shard
    stats = ShardStats()
    with caplog.at_level(logging.WARNING, logger="apt_data.shards"):
        recs = list(iter_shard(path, stats=stats))
    assert [r.key for r in recs] == ["good0", "good1", "good2", "good3"]
    assert stats.samples == 4
    assert dict(stats.skipped) == {k: 1 for k in BAD_KINDS}
    for kind in BAD_KINDS:
        assert any(f"bad_{kind}" in r.message and str(path) in r.message and kind in r.message for r in caplog.records)
    # the good samples come back exactly as written
    for rec, (key, enc, meta) in zip(recs, encoded):
        assert rec.jpeg == enc.jpeg and rec.meta == meta and rec.label == int(key[-1])
        np.testing.assert_array_equal(rec.scores, enc.scores)


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_strict_raises_naming_shard_and_key(tmp_path, encoded, kind):
    path = tmp_path / f"strict-{kind}.tar"
    rows = write_shard(path, [("good0", good_members(encoded[0][1], encoded[0][2], 0)),
                              (f"bad_{kind}", bad_members(kind, encoded[1][1], encoded[1][2]))])
    it = iter_shard(path, strict=True)
    assert next(it).key == "good0"
    with pytest.raises(ShardDataError, match=f"strict-{kind}.tar.*bad_{kind}.*{kind}") as e:
        next(it)
    assert isinstance(e.value, ValueError) and e.value.reason == kind and e.value.key == f"bad_{kind}"
    with pytest.raises(ValueError, match=f"strict-{kind}.tar.*bad_{kind}"):
        read_sample(rows[1], tmp_path, strict=True)
    stats = ShardStats()
    assert read_sample(rows[1], tmp_path, stats=stats) is None and stats.skipped[kind] == 1


def test_read_sample_seeks_and_matches_stream(mixed_shard):
    path, rows = mixed_shard
    streamed = {r.key: r for r in iter_shard(path)}
    stats = ShardStats()
    got = {row["key"]: read_sample(row, path.parent, stats=stats) for row in rows}
    assert {k for k, r in got.items() if r is not None} == set(streamed)
    for k, r in streamed.items():
        g = got[k]
        assert (g.jpeg, g.label, g.meta) == (r.jpeg, r.label, r.meta)
        np.testing.assert_array_equal(g.scores, r.scores)
    assert stats.samples == 4 and stats.num_skipped == len(BAD_KINDS)


def test_truncated_tar_in_the_middle_of_a_shard_list(tmp_path, encoded, caplog):
    keys = []
    for s in range(3):
        samples = [(f"s{s}_{k}", good_members(e, m, i)) for i, (k, e, m) in enumerate(encoded[:4])]
        keys.append([k for k, _ in samples])
        rows = write_shard(tmp_path / f"part-{s:06d}.tar", samples)
        if s == 1:
            mid_rows = rows
    # cut shard 1 in the middle of the JPEG of its third sample
    p1 = tmp_path / "part-000001.tar"
    cut = mid_rows[2]["jpg_offset"] + mid_rows[2]["jpg_size"] // 2
    p1.write_bytes(p1.read_bytes()[:cut])
    url = str(tmp_path / "part-{000000..000002}.tar")
    assert expand_urls(url) == [str(tmp_path / f"part-{s:06d}.tar") for s in range(3)]
    stats = ShardStats()
    with caplog.at_level(logging.WARNING, logger="apt_data.shards"):
        got = [r.key for r in iter_shards(url, stats=stats)]
    assert got == keys[0] + keys[1][:2] + keys[2]
    assert dict(stats.skipped) == {"truncated_tar": 1}
    ev = stats.events[0]
    assert ev.shard == str(p1) and ev.key == "s1_good2"
    assert any("part-000001.tar" in r.message and "s1_good2" in r.message for r in caplog.records)
    # strict: the samples before the cut come out, then an error naming shard and key
    seen = []
    with pytest.raises(ShardDataError, match=r"part-000001\.tar.*s1_good2.*truncated_tar"):
        for r in iter_shards(url, strict=True):
            seen.append(r.key)
    assert seen == keys[0] + keys[1][:2]
    # random access: rows before the cut read fine, the cut one is reported
    assert read_sample(mid_rows[1], tmp_path, strict=True).key == "s1_good1"
    st = ShardStats()
    assert read_sample(mid_rows[2], tmp_path, stats=st) is None and st.skipped["truncated_tar"] == 1
    # a tar cut exactly at a sample boundary (no end-of-archive blocks) is noticed too
    p1.write_bytes(p1.read_bytes()[: mid_rows[2]["cls_offset"] - 512])
    st = ShardStats()
    assert [r.key for r in iter_shard(p1, stats=st)] == keys[1][:1] and st.skipped["truncated_tar"] == 1
    assert st.events[0].key == "s1_good1"  # cannot know it was complete: reported, not yielded


def test_validate_decodes_the_jpeg(tmp_path, encoded):
    _, enc, meta = encoded[0]
    m = good_members(enc, meta, 0)
    garbage = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    m["jpg"] = b"\xff\xd8\xff" + garbage + b"\xff\xd9"   # right markers, undecodable body
    path = tmp_path / "v.tar"
    write_shard(path, [("fake", m), ("good1", good_members(encoded[1][1], encoded[1][2], 1))])
    assert [r.key for r in iter_shard(path)] == ["fake", "good1"]  # cheap checks cannot tell
    stats = ShardStats()
    assert [r.key for r in iter_shard(path, validate=True, stats=stats)] == ["good1"]
    assert stats.skipped["corrupt_jpeg"] == 1 and stats.events[0].key == "fake"


def test_read_sample_detects_a_stale_index(tmp_path, encoded):
    path = tmp_path / "stale.tar"
    rows = write_shard(path, [(k, good_members(e, m, i)) for i, (k, e, m) in enumerate(encoded[:3])])
    write_shard(path, [(k, good_members(e, m, i)) for i, (k, e, m) in enumerate(encoded[3:6])])
    stats = ShardStats()
    assert all(read_sample(r, tmp_path, stats=stats) is None for r in rows)
    assert stats.skipped["index_mismatch"] == 3
    with pytest.raises(ShardDataError, match="stale.tar.*good0.*index_mismatch"):
        read_sample(rows[0], tmp_path, strict=True)


def test_shard_writer_is_atomic(tmp_path, encoded):
    k, e, m = encoded[0]
    path = tmp_path / "a.tar"
    w = ShardWriter(path)
    w.write(k, good_members(e, m, 0))
    assert not path.exists() and (tmp_path / "a.tar.tmp").stat().st_size > 0  # only the .tmp while writing
    w.commit()
    assert path.exists() and not (tmp_path / "a.tar.tmp").exists()
    assert [r.key for r in iter_shard(path, strict=True)] == [k]
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "b.tar") as w2:
            w2.write(k, good_members(e, m, 0))
            raise RuntimeError("worker died")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar"]
    with pytest.raises(ValueError, match="invalid sample key"):
        ShardWriter(tmp_path / "c.tar").write("has.dot", {"cls": b"0"})


def test_members_are_fixed_and_never_pickled(tmp_path, encoded):
    path = tmp_path / "p.tar"
    with ShardWriter(path) as w:
        for i, (k, e, m) in enumerate(encoded[:2]):
            w.write_sample(k, e.jpeg, i, m, e.scores)
    with tarfile.open(path) as tf:
        infos = tf.getmembers()
        assert [i.name for i in infos] == [f"{k}.{x}" for k, _, _ in encoded[:2] for x in ("cls", "jpg", "json", "npy")]
        assert all(i.isreg() and i.uid == 0 and i.gid == 0 and i.mtime == 946684800 and i.uname == "" for i in infos)
        raw = tf.extractfile(infos[3]).read()
    arr = np.load(io.BytesIO(raw), allow_pickle=False)
    assert arr.dtype == np.dtype("<f4") and arr.shape == (14 * 14 + 7 * 7 + 3 * 3,)
    with pytest.raises(ValueError):
        w = ShardWriter(tmp_path / "obj.tar")
        w.write_sample("x", encoded[0][1].jpeg, 0, {}, np.array([1, "a"], dtype=object))


def test_encode_sample_keeps_jpegs_at_size_and_reencodes_the_rest(tmp_path):
    src = np.asarray(Image.open(IMAGE_PATHS[1]).convert("RGB").resize((224, 224), Image.BICUBIC))
    Image.fromarray(src).save(tmp_path / "at_size.jpg", quality=90)
    Image.fromarray(src).save(tmp_path / "lossless.png")
    kept = encode_sample(tmp_path / "at_size.jpg", CFG, 224)
    assert not kept.reencoded and kept.jpeg == (tmp_path / "at_size.jpg").read_bytes()
    png = encode_sample(tmp_path / "lossless.png", CFG, 224)
    assert png.reencoded and png.jpeg[:3] == b"\xff\xd8\xff"
    mse = ((png.image.astype(float) - src) ** 2).mean()
    assert 10 * np.log10(255**2 / mse) > 30  # PSNR of a q95 JPEG of the same pixels
    big = encode_sample(IMAGE_PATHS[1], CFG, 224)  # 500x375 JPEG: resized, so re-encoded
    assert big.reencoded and big.orig_size == Image.open(IMAGE_PATHS[1]).size and big.image.shape == (224, 224, 3)
    for enc in (kept, png, big):  # scores and tokens are those of the stored, decoded JPEG
        stored = decode_image(enc.jpeg)
        np.testing.assert_array_equal(stored, enc.image)
        np.testing.assert_allclose(enc.scores, np.concatenate([m.ravel() for m in score_maps(stored, 16, 3)]), atol=1e-4)
        np.testing.assert_array_equal(enc.tokens, patchify(stored, CFG).counts())


def test_list_image_folder_and_file_list(tmp_path):
    for cls in ("zebra", "apple"):
        (tmp_path / "src" / cls / "sub").mkdir(parents=True)
    (tmp_path / "src" / "zebra" / "b.JPEG").write_bytes(b"x")
    (tmp_path / "src" / "zebra" / "sub" / "a.png").write_bytes(b"x")
    (tmp_path / "src" / "apple" / "c.jpg").write_bytes(b"x")
    (tmp_path / "src" / "apple" / "notes.txt").write_text("not listed")
    (tmp_path / "src" / "apple" / ".hidden.jpg").write_bytes(b"x")
    got = [(p.relative_to(tmp_path / "src").as_posix(), lab, c) for p, lab, c in list_image_folder(tmp_path / "src")]
    assert got == [("apple/c.jpg", 0, "apple"), ("zebra/b.JPEG", 1, "zebra"), ("zebra/sub/a.png", 1, "zebra")]
    lst = tmp_path / "list.tsv"
    lst.write_text("# comment\nsrc/apple/c.jpg\t3\tapple\n\nsrc/zebra/b.JPEG\t5\n")
    assert read_file_list(lst) == [(tmp_path / "src/apple/c.jpg", 3, "apple"), (tmp_path / "src/zebra/b.JPEG", 5, "5")]
    lst.write_text("src/apple/c.jpg\tcat\n")
    with pytest.raises(ValueError, match="list.tsv:1"):
        read_file_list(lst)


# ---------------------------------------------------------------- the committed sample dataset

@pytest.mark.parametrize("split, n", [("train", 400), ("val", 100)])
def test_committed_sample_dataset_loads(split, n):
    idx = read_index(SHARDS, split)  # the folder + split, i.e. shards/<split>.parquet
    assert len(idx) == n and idx.config == APTConfig() and idx.root == SHARDS
    assert idx.settings["image_size"] == 224 and idx.settings["crop"] is True
    a = idx.arrays()
    assert np.bincount(a["label"], minlength=10).tolist() == [n // 10] * 10
    assert (a["width"] == 224).all() and (a["height"] == 224).all()
    assert len(set(a["key"])) == n
    classes = [line.split("\t") for line in (SHARDS / "classes.tsv").read_text().splitlines()[1:]]
    assert [int(c[0]) for c in classes] == list(range(10))
    assert [c["class"] for c in idx.settings["classes"]] == [c[1] for c in classes] == sorted(c[1] for c in classes)
    assert classes[0][1:] == ["n01440764", "tench", "0"] and classes[9][1:] == ["n03888257", "parachute", "701"]
    stats = ShardStats()
    recs = [idx.read_sample(i, strict=True, stats=stats) for i in range(n)]
    assert stats.samples == n
    assert [r.label for r in recs] == a["label"].tolist()
    assert all(r.meta["wnid"] == classes[r.label][1] and r.meta["imagenet_index"] == int(classes[r.label][3]) for r in recs)
    # token counts and score maps in the shards are those of the stored images (a sample of them)
    tokens = idx.token_counts()
    for i in range(0, n, n // 10):
        img = recs[i].image()
        np.testing.assert_array_equal(tokens[i], patchify(img, idx.config).counts())
        for got, want in zip(recs[i].score_maps(), score_maps(img, 16, 3)):
            np.testing.assert_allclose(got, want, atol=1e-4)
    # sequential reading of the same shards gives the same samples in the same order
    streamed = list(iter_shards([str(p) for p in idx.shard_paths()], strict=True))
    assert [r.key for r in streamed] == a["key"].tolist()


def test_committed_splits_are_disjoint_and_small():
    tr, va = (set(read_index(SHARDS / f"{s}.parquet").column("source")) for s in ("train", "val"))
    assert len(tr) == 400 and len(va) == 100 and not tr & va
    total = sum(p.stat().st_size for p in SHARDS.iterdir())
    assert total < 8.5e6, total
    assert (SHARDS / "README.md").exists()
    with pytest.raises(ValueError, match="no index test.parquet.*train.parquet"):
        read_index(SHARDS, "test")


def test_corrupt_tar_header_stops_that_shard_only(tmp_path, encoded):
    rows = write_shard(tmp_path / "h-000000.tar", [(k, good_members(e, m, i)) for i, (k, e, m) in enumerate(encoded[:3])])
    write_shard(tmp_path / "h-000001.tar", [("other", good_members(encoded[3][1], encoded[3][2], 3))])
    p = tmp_path / "h-000000.tar"
    data = bytearray(p.read_bytes())
    at = rows[1]["jpg_offset"] - 512  # the header of good1.jpg
    data[at:at + 100] = b"#" * 100
    p.write_bytes(bytes(data))
    stats = ShardStats()
    assert [r.key for r in iter_shards(str(tmp_path / "h-{000000..000001}.tar"), stats=stats)] == ["good0", "other"]
    assert dict(stats.skipped) == {"corrupt_tar": 1} and stats.events[0].key == "good1"
    with pytest.raises(ShardDataError, match="h-000000.tar.*good1.*corrupt_tar"):
        list(iter_shard(p, strict=True))


def test_reads_shards_written_by_webdataset_and_long_pax_names(tmp_path, encoded):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "wds.tar")) as w:
        for i, (k, e, m) in enumerate(encoded[:2]):
            w.write({"__key__": k, "jpg": e.jpeg, "cls": i, "json": m})
    assert [(r.key, r.label, r.meta) for r in iter_shard(tmp_path / "wds.tar", strict=True)] == \
        [(k, i, m) for i, (k, _, m) in enumerate(encoded[:2])]
    long_key = "d" * 120 + "/" + "k" * 150  # needs PAX headers
    with tarfile.open(tmp_path / "pax.tar", "w", format=tarfile.PAX_FORMAT) as tf:
        for ext, data in (("cls", b"4"), ("jpg", encoded[0][1].jpeg)):
            info = tarfile.TarInfo(f"{long_key}.{ext}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    [rec] = list(iter_shard(tmp_path / "pax.tar", strict=True))
    assert (rec.key, rec.label, rec.jpeg, rec.scores) == (long_key, 4, encoded[0][1].jpeg, None)
