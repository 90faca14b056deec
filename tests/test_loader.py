"""APTLoader: exactly-once epochs, determinism, resume, bad data, batches equal to per-image packing."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from apt_data import APTConfig, patchify
from apt_data.loader import APTLoader
from apt_data.assemble import pack_images
from apt_data.sources import FolderSource, open_source
from apt_data.transforms import ImageTransform
from apt_data.transport import SlotPool, WireBatch
from conftest import IMAGE_PATHS

SHARDS = Path(__file__).resolve().parents[1] / "shards"


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
@pytest.mark.parametrize("packing", ["plan", "stream"])
def test_every_sample_exactly_once_per_epoch(folder, workers, packing):
    src = FolderSource(folder)
    # planned epochs read every sample once; so does a streamed evaluation pass
    planned = {"plan": True, "stream": False}[packing]
    loader = APTLoader(src, APTConfig(), max_tokens=1200, num_workers=workers, image_size=224, seed=1,
                       packing=packing, train=planned)
    n = len(loader)
    batches = keys_of_epoch(loader)
    if planned:
        assert len(batches) == n
    flat = [k for b in batches for k in b]
    assert sorted(flat) == sorted(src.keys)
    # labels follow the class folders
    for batch, _ in APTLoader(src, APTConfig(), max_tokens=1200, num_workers=0, image_size=224):
        for key, label in zip(batch.keys, batch.labels.tolist()):
            assert key.startswith(f"class{label}/")


def test_epochs_are_deterministic_and_resumable(folder):
    mk = lambda: APTLoader(FolderSource(folder), APTConfig(), max_tokens=1000, num_workers=0, seed=7,  # noqa: E731
                           packing="plan")  # noqa: E731
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
    loader = APTLoader(src, cfg, max_tokens=1500, num_workers=0, transform=tr, num_prefix_tokens=1, train=False)
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
    loader = APTLoader(src, APTConfig(), max_tokens=1200, num_workers=0, train=False)
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
    loader = APTLoader(FolderSource(folder), APTConfig(), max_tokens=150, num_workers=0, packing="plan")
    with pytest.raises(ValueError, match=r"needs 197 tokens, more than the batch budget max_tokens=150"):
        len(loader)  # planned from the uniform-grid bound
    loader = APTLoader(FolderSource(folder), APTConfig(), max_tokens=150, num_workers=0)
    with pytest.raises(ValueError, match=r"sample class0/\S+ needs \d+ tokens, more than the batch budget max_tokens=150"):
        len(loader)  # streamed: the real count of a probed sample


def test_ranks_split_the_epoch(folder):
    src = FolderSource(folder)
    per_rank = []
    for r in range(3):
        loader = APTLoader(src, APTConfig(), max_tokens=700, num_workers=0, rank=r, world_size=3, seed=3,
                           packing="plan")
        per_rank.append(keys_of_epoch(loader))
    assert len({len(b) for b in per_rank}) == 1
    flat = [k for rank in per_rank for b in rank for k in b]
    assert sorted(flat) == sorted(src.keys)


def test_augmented_training_is_seeded_per_sample(folder):
    tr = ImageTransform(size=224, augment=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5)
    a = APTLoader(FolderSource(folder), APTConfig(), max_tokens=1200, num_workers=2, transform=tr, seed=5,
                  packing="plan")
    b = APTLoader(FolderSource(folder), APTConfig(), max_tokens=1200, num_workers=0, transform=tr, seed=5,
                  packing="plan")
    for (ba, _), (bb, _) in zip(a, b):
        assert ba.keys == bb.keys
        for s in range(3):
            assert torch.equal(ba.pixels[s], bb.pixels[s])


def batch_arrays(batch):
    return [*batch.pixels, *batch.coords, *batch.seq_index, batch.labels]  # seqlens: compared as ints


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys == b.keys and a.seqlens == b.seqlens and a.image_sizes == b.image_sizes
        for x, y in zip(batch_arrays(a), batch_arrays(b)):
            assert x.dtype == y.dtype and torch.equal(x, y)


def two_epochs(loader):
    out = []
    for e in range(2):
        loader.set_epoch(e)
        out += [batch for batch, _ in loader]  # held: the workers reuse their slots meanwhile
    return out


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_worker_batches_equal_in_process_batches_and_stay_intact(folder, source, monkeypatch):
    """Forked workers pack into reused shared-memory slots that the main process copies out of:
    batches held over two epochs (every slot reused many times meanwhile) equal in-process ones."""
    released = []
    release = SlotPool.release
    monkeypatch.setattr(SlotPool, "release", lambda self, w, k: (released.append(k), release(self, w, k)))
    src = FolderSource(folder) if source == "folder" else open_source(f"{SHARDS}:val")
    a = APTLoader(src, APTConfig(), max_tokens=1200, num_workers=2, seed=3, prefetch_factor=1, packing="plan")
    b = APTLoader(src, APTConfig(), max_tokens=1200, num_workers=0, seed=3, packing="plan")
    got = two_epochs(a)
    assert len(released) == len(got)  # every batch came through a slot (2 per worker, reused)
    assert_same_batches(got, two_epochs(b))


def test_batches_without_a_free_slot_take_a_fresh_segment(folder, monkeypatch):
    monkeypatch.setattr(SlotPool, "acquire", lambda self, worker, nbytes: None)
    src = FolderSource(folder)
    got = [b for b, _ in APTLoader(src, APTConfig(), max_tokens=1000, num_workers=2, seed=4, packing="plan")]
    assert_same_batches(got, [b for b, _ in APTLoader(src, APTConfig(), max_tokens=1000, num_workers=0, seed=4,
                                                      packing="plan")])


def test_an_abandoned_iteration_does_not_disturb_the_next(folder):
    src = FolderSource(folder)
    loader = APTLoader(src, APTConfig(), max_tokens=1000, num_workers=2, seed=6, packing="plan")
    it = iter(loader)
    first = next(it)[0]
    got = [b for b, _ in loader]  # while `it` (and its workers) are still alive
    want = [b for b, _ in APTLoader(src, APTConfig(), max_tokens=1000, num_workers=0, seed=6, packing="plan")]
    assert_same_batches(got, want)
    assert_same_batches([first], want[:1])
    it.close()
    assert_same_batches([b for b, _ in loader], want)


def test_stored_scores_give_the_layouts_of_rescoring():
    """From shards made with the same config and transform, the loader uses the stored score maps
    instead of rescoring: every image's tokens equal packing the decoded image with patchify."""
    cfg = APTConfig()
    src = open_source(f"{SHARDS}:val")
    loader = APTLoader(src, cfg, max_tokens=2000, num_workers=2, seed=0)
    assert loader.exact_counts
    seen = 0
    for batch, _ in loader:
        for b, key in enumerate(batch.keys):
            i = src.keys.index(key)
            img = loader.transform(src.read(i), key)
            single = pack_images([img], cfg, labels=[int(src.labels[i])])
            for s in range(cfg.num_scales):
                mine = batch.coords[s][:, 0] == b
                assert torch.equal(batch.pixels[s][mine], single.pixels[s])
                assert torch.equal(batch.coords[s][mine][:, 1:], single.coords[s][:, 1:])
            seen += 1
    assert seen == len(src)


def test_index_source_fast_reads_equal_read_sample_and_fall_back_on_a_stale_shard(tmp_path):
    from apt_data.shards import ShardDataError, read_sample

    src = open_source(f"{SHARDS}:val")
    for i in range(len(src)):
        jpeg, rec = src.read_record(i)
        want = read_sample(src.row(i), src.index.root, strict=True)
        assert jpeg == want.jpeg == src.read(i) and rec.key == want.key and rec.label == want.label
        assert rec.meta == want.meta and rec.shard == want.shard and np.array_equal(rec.scores, want.scores)
        assert rec.scores.flags.writeable
        data, scores = src.read_scores(i)
        assert data == want.jpeg and np.array_equal(scores, want.scores)
    # a shard rewritten since the index was made: the fast path notices, read_sample names the problem
    shutil.copy(SHARDS / "val.parquet", tmp_path / "val.parquet")
    tar = bytearray((SHARDS / "val-000000.tar").read_bytes())
    row = src.row(0)
    for member in ("jpg", "npy"):
        at = row[f"{member}_offset"] - 512
        tar[at:at + 3] = b"zzz"  # the member's name in its tar header
    (tmp_path / "val-000000.tar").write_bytes(bytes(tar))
    stale = open_source(f"{tmp_path}:val")
    for read in (stale.read, stale.read_record, stale.read_scores):
        with pytest.raises(ShardDataError, match="index_mismatch"):
            read(0)
    assert stale.read(1) == src.read(1)


def test_pinning_copies_a_slot_once_into_page_locked_memory(folder, monkeypatch):
    """The DataLoader's pin-memory thread calls `WireBatch.pin_memory`: one copy, slot -> pinned
    buffer (on a machine without CUDA, a stand-in records the request)."""
    import apt_data.transport as T
    from apt_data.assemble import fill_batch, prepare_batch

    if not torch.cuda.is_available():
        asked = []
        monkeypatch.setattr(T, "host_buffer", lambda n, pin: (asked.append(pin), torch.empty(n, dtype=torch.uint8))[1])
    images = [np.asarray(ImageTransform(size=224)(p.read_bytes())) for p in IMAGE_PATHS[:3]]
    spec, images, layouts, labels = prepare_batch(images, APTConfig(), [0, 1, 2], 1, None, 0, keys=["a", "b", "c"])
    pool = SlotPool(1, 2, spec.nbytes)
    pool.reset()
    slot = pool.acquire(0, spec.nbytes)
    fill_batch(spec, images, layouts, labels, pool.view(0, slot, spec.nbytes))
    pinned = WireBatch(spec, pool.id, 0, slot).pin_memory()
    assert pool.acquire(0, spec.nbytes) is not None and pool.acquire(0, spec.nbytes) is not None  # slot handed back
    pool.view(0, slot, spec.nbytes)[:] = 0  # the slot is reused: the batch must not change
    got = pinned.to_batch()
    from dataclasses import replace

    assert_same_batches([got], [replace(pack_images(images, APTConfig(), labels=[0, 1, 2]), keys=("a", "b", "c"))])
    if torch.cuda.is_available():
        assert got.pixels[0].is_pinned()
    else:
        assert asked == [True]


_WARMUP_CHECK = r"""
import sys, numba, apt_data
from apt_data.assemble import pack_images
apt_data.warmup()
def versions():
    return {f"{m}.{n}": len(d.signatures) for m, mod in list(sys.modules.items()) if m.startswith("apt_data")
            for n, d in vars(mod).items() if isinstance(d, numba.core.registry.CPUDispatcher)}
before = versions()
images = [apt_data.decode_image(p, 384) for p in sys.argv[1:]]
assert not images[0].flags.writeable  # what the loader's workers get
pack_images(images, apt_data.APTConfig())
after = versions()
print({k: (before.get(k, 0), v) for k, v in after.items() if v != before.get(k, 0)})
"""


def test_warmup_covers_the_kernel_versions_a_worker_uses():
    """Workers fork after `warmup()`: packing decoded (read-only) photos must not load or compile
    another version of any kernel in the worker (each would be loaded again in every worker, every epoch)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", _WARMUP_CHECK, *map(str, IMAGE_PATHS[:2])], cwd=root,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "{}", f"kernels given a new version after warmup (before, after): {out.stdout}"


# ------------------------------------------------------------------------------ streamed packing
AUGMENT = ImageTransform(size=224, augment=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory) -> Path:
    """96 photos (the 32 real test photos, 3 copies each under other names), 3 classes."""
    root = tmp_path_factory.mktemp("big")
    for c in range(3):
        for k, p in enumerate(IMAGE_PATHS):
            d = root / f"class{k % 3}"
            d.mkdir(exist_ok=True)
            shutil.copy(p, d / f"{c}_{p.name}")
    return root


def stream_loader(folder, workers=2, **kw):
    return APTLoader(FolderSource(folder), APTConfig(), max_tokens=1200, num_workers=workers, transform=AUGMENT,
                     seed=9, packing="stream", **kw)


def epoch_batches(loader, epoch, limit=None):
    """(keys, real tokens) of ``epoch``'s batches (the first ``limit``)."""
    loader.set_epoch(epoch)
    out = []
    for batch, targets in loader:
        assert torch.equal(targets, batch.labels) and batch.num_images > 0
        out.append((batch.keys, batch.num_real_tokens))
        if limit is not None and len(out) == limit:
            break
    return out


def test_streamed_training_fills_batches_without_repeats_within_an_epoch(big_folder):
    loader = stream_loader(big_folder)
    steps = len(loader)
    assert steps == loader.steps_per_epoch() and steps % 2 == 0  # dealt evenly to the 2 workers
    seen = []
    for epoch in range(3):
        assert len(loader) == steps
        batches = epoch_batches(loader, epoch)
        keys = [k for b, _ in batches for k in b]
        assert len(batches) == steps and len(keys) == len(set(keys))  # no sample twice in an epoch
        fills = [t / 1200 for _, t in batches]
        assert np.mean(fills) > 0.95 and min(fills) > 0.85, fills
        assert loader.stats.carried_over[epoch] > 0
        seen.extend(keys)
    # about one pass per epoch: after 3 epochs every photo was trained on, none more than 3 times
    counts = {k: seen.count(k) for k in set(seen)}
    assert set(counts) == set(loader.source.keys) and max(counts.values()) <= 3
    # the upper-bound plan of the same augmented epoch fills far less
    plan = APTLoader(FolderSource(big_folder), APTConfig(), max_tokens=1200, num_workers=0, transform=AUGMENT,
                     seed=9, packing="plan")
    assert np.mean([b.num_real_tokens / 1200 for b, _ in plan]) < 0.9


def test_streamed_epochs_are_deterministic(big_folder):
    a, b = stream_loader(big_folder), stream_loader(big_folder)
    assert [epoch_batches(a, e) for e in range(2)] == [epoch_batches(b, e) for e in range(2)]


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_state_dict_resumes_mid_epoch(big_folder, tmp_path, workers):
    folder = big_folder
    want = stream_loader(folder, workers)
    want_batches = [epoch_batches(want, e) for e in range(3)]
    run = stream_loader(folder, workers)
    assert epoch_batches(run, 0) == want_batches[0]
    assert epoch_batches(run, 1, limit=3) == want_batches[1][:3]  # killed after 3 batches of epoch 1
    torch.save(run.state_dict(), tmp_path / "loader.pt")
    resumed = stream_loader(folder, workers)
    resumed.load_state_dict(torch.load(tmp_path / "loader.pt", weights_only=True))
    assert len(resumed) == len(want_batches[1]) - 3
    assert epoch_batches(resumed, 1) == want_batches[1][3:]
    assert epoch_batches(resumed, 2) == want_batches[2]
    with pytest.raises(ValueError, match="num_workers"):
        stream_loader(folder, workers + 1).load_state_dict(run.state_dict())


def test_streamed_eval_reads_every_sample_once_with_thresholds_other_than_the_index(caplog):
    cfg = APTConfig(thresholds=(6.0, 4.5))
    loader = APTLoader(str(SHARDS) + ":val", cfg, max_tokens=2048, num_workers=2, train=False)
    assert loader.transform.size == 224 and loader.packing == "stream" and loader._scores  # the index's size
    batches = [b for b, _ in loader]
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == sorted(loader.source.keys)
    assert np.mean([b.num_real_tokens / 2048 for b in batches[:-2]]) > 0.97  # all but the workers' last
    src = loader.source
    for b in batches[:2]:  # layouts from the stored score maps equal rescoring at these thresholds
        for k, n in zip(b.keys, b.seqlens):
            img = ImageTransform(size=224)(src.read(src.keys.index(k)), k)
            assert len(patchify(img, cfg)) + 1 == n
    with caplog.at_level("WARNING"):
        APTLoader(str(SHARDS) + ":val", cfg, max_tokens=2048, num_workers=0, train=False, image_size=256)
    assert "pass image_size=224" in caplog.text


def test_an_epoch_of_mostly_bad_samples_stops_with_a_clear_error(folder, tmp_path):
    from apt_data.loader import TooManySkipped

    bad = tmp_path / "mostly_bad"
    for k in range(14):  # 14 unreadable files next to 2 photos
        d = bad / f"class{k % 2}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"bad{k}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    for k, p in enumerate(IMAGE_PATHS[:2]):
        shutil.copy(p, bad / f"class{k}" / p.name)
    for packing in ("plan", "stream"):
        loader = APTLoader(FolderSource(bad), APTConfig(), max_tokens=1200, num_workers=0, train=False,
                           packing=packing)
        with pytest.raises(TooManySkipped, match=r"bad samples skipped in epoch 0 .*max_skip_fraction"):
            keys_of_epoch(loader)
    relaxed = APTLoader(FolderSource(bad), APTConfig(), max_tokens=1200, num_workers=0, train=False,
                        max_skip_fraction=1.0)
    assert sorted(k for b in keys_of_epoch(relaxed) for k in b) == sorted(f"class{k}/{p.name}"
                                                                         for k, p in enumerate(IMAGE_PATHS[:2]))
    assert relaxed.stats.num_skipped == 14


def test_a_bin_of_bad_samples_only_is_never_an_empty_batch(folder, tmp_path):
    bad = tmp_path / "bad_bins"
    shutil.copytree(folder, bad)
    (bad / "class0" / "zero.jpg").write_bytes(b"")
    (bad / "class1" / "text.jpg").write_text("not an image at all")
    for packing in ("plan", "stream"):  # one image per batch: each bad file is a bin of its own
        loader = APTLoader(FolderSource(bad), APTConfig(), max_tokens=1200, max_images=1, num_workers=2,
                           train=False, packing=packing)
        batches = [b for b, _ in loader]
        assert all(b.num_images == 1 for b in batches) and len(batches) == len(loader.source) - 2
        assert loader.stats.num_skipped == 2


@pytest.mark.parametrize("damage", ["nan", "noise"])
def test_corrupt_score_maps_are_a_counted_skip(tmp_path, damage):
    """A shard sample whose .npy member was overwritten (NaN, or random finite scores that change its
    token count) is skipped with a reason, not fatal; every other sample comes once."""
    import pyarrow as pa
    import pyarrow.compute  # noqa: F401

    from apt_data import read_index
    from apt_data.shards import write_index

    index = read_index(SHARDS, "train")
    rows = index.table.filter(pa.compute.equal(index.table.column("shard"), "train-000000.tar")).slice(0, 16)
    data = bytearray((index.root / "train-000000.tar").read_bytes())
    bad = rows.slice(5, 1).to_pylist()[0]
    end = bad["npy_offset"] + bad["npy_size"]
    n = 64  # float32 score values at the end of the member's data
    rng = np.random.default_rng(0)
    values = np.full(n, np.nan, np.float32) if damage == "nan" else rng.uniform(0, 9, n).astype(np.float32)
    data[end - 4 * n:end] = values.tobytes()
    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(bytes(data))
    rows = rows.set_column(rows.column_names.index("shard"), "shard", pa.array([str(shard)] * rows.num_rows))
    keep = [c for c in rows.column_names if not c.endswith("_checksum")]  # this test targets the scores path
    write_index(tmp_path / "bad.parquet", rows.select(keep), index.config,
                {k: v for k, v in index.settings.items() if k != "shards"})
    for packing in ("plan", "stream"):
        loader = APTLoader(str(tmp_path / "bad.parquet"), APTConfig(), max_tokens=2048, num_workers=0, train=False,
                           packing=packing)
        keys = [k for b, _ in loader for k in b.keys]
        assert loader.stats.skipped_keys == [bad["key"]], loader.stats.skipped
        assert sorted(keys) == sorted(k for k in rows.column("key").to_pylist() if k != bad["key"])


def test_keep_aspect_planning_skips_an_unreadable_file(folder, tmp_path):
    bad = tmp_path / "aspect"
    shutil.copytree(folder, bad)
    (bad / "class2" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    tr = ImageTransform(size=224, keep_aspect=True)
    for packing in ("plan", "stream"):
        loader = APTLoader(FolderSource(bad), APTConfig(), max_tokens=2000, num_workers=0, train=False,
                           transform=tr, packing=packing)
        keys = [k for b in keys_of_epoch(loader) for k in b]
        assert sorted(keys) == sorted(k for k in loader.source.keys if "broken" not in k)
        assert loader.stats.skipped_keys == ["class2/broken.jpg"]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_whole_pass_epoch_resumes_mid_epoch_and_skips_a_bad_file(folder, tmp_path, workers):
    """A source small enough for whole-pass epochs (docs/loader.md, "Small sources"): a run stopped
    after one batch of epoch 1 and resumed from its state_dict gives the uninterrupted batches, and a
    corrupt photo is one counted, named skip while every other photo comes once in every epoch."""
    root = tmp_path / "small"
    shutil.copytree(folder, root)
    (root / "class0" / "zz_corrupt.JPEG").write_bytes(b"\xff\xd8 not a jpeg")
    want = stream_loader(root, workers)
    assert want.strategy.steps_per_epoch() and want.strategy.whole_pass
    want_batches = [epoch_batches(want, e) for e in range(2)]
    good = set(want.source.keys) - {"class0/zz_corrupt.JPEG"}
    for e, batches in enumerate(want_batches):
        keys = [k for b, _ in batches for k in b]
        assert sorted(keys) == sorted(good) and want.stats.carried_over[e] == 0
    assert want.stats.num_skipped == 1 and want.stats.skipped_keys == ["class0/zz_corrupt.JPEG"]  # counted once
    run = stream_loader(root, workers)
    assert epoch_batches(run, 0) == want_batches[0]
    assert epoch_batches(run, 1, limit=1) == want_batches[1][:1]  # stopped after one batch of epoch 1
    state = run.state_dict()
    assert state["whole_pass"] is True
    resumed = stream_loader(root, workers)
    resumed.load_state_dict(state)
    assert epoch_batches(resumed, 1) == want_batches[1][1:]
