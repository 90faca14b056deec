"""Bad data and small data through the public paths (`tools/train.py`, `APTLoader`): a dead partition
stops the epoch with `TooManySkipped` instead of hanging, a bad file counts once and is named once,
planned ranks stay in step when whole bins are bad, and a small folder's streamed epoch is one pass."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from apt_data import APTConfig
from apt_data.loader import APTLoader
from apt_data.loader.stream import partition
from apt_data.sources import FolderSource
from apt_data.transforms import ImageTransform
from conftest import IMAGE_PATHS

ROOT = Path(__file__).resolve().parents[1]
NOT_A_PHOTO = b"\xff\xd8 not a jpeg"


def photo_folder(root: Path, n: int, classes: int = 3) -> Path:
    """``n`` real photos (the test photos, repeated) in ``classes`` class folders."""
    for k in range(n):
        d = root / f"class{k % classes}"
        d.mkdir(parents=True, exist_ok=True)
        p = IMAGE_PATHS[k % len(IMAGE_PATHS)]
        shutil.copy(p, d / f"{k:03d}_{p.name}")
    return root


def run_python(code: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ))


def test_a_folder_of_bad_photos_stops_training_instead_of_hanging(tmp_path):
    data = tmp_path / "data"
    for k in range(60):
        d = data / f"class{k % 2}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"bad{k}.jpg").write_bytes(NOT_A_PHOTO)
    shutil.copy(IMAGE_PATHS[0], data / "class0" / "good.jpg")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), "--data", str(data), "--no-eval",
                           "--workers", "2", "--max-tokens", "2048", "--output", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=30, env=dict(os.environ))
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert "bad samples skipped in epoch 0 of rank 0, worker" in error and "max_skip_fraction" in error, error
    assert "first errors: class" in error and "not an image" in error  # its files' first errors, named
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if "WARNING" in line]
    assert len(warnings) < 100


@pytest.mark.parametrize("max_skip_fraction, why", [(0.01, "more than 1.0% of its 15 samples"),
                                                    (1.0, "none of its 15 samples is readable")])
def test_a_worker_whose_whole_partition_is_bad_ends_the_epoch(tmp_path, max_skip_fraction, why):
    folder = photo_folder(tmp_path / "data", 60)
    keys = FolderSource(folder).keys
    for i in partition(60, 0, 0, 1, 0, 4):  # worker 0 of 4 owns these 15
        (folder / keys[i]).write_bytes(NOT_A_PHOTO)
    code = (f"from apt_data import APTConfig\nfrom apt_data.loader import APTLoader, TooManySkipped\n"
            f"loader = APTLoader({str(folder)!r}, APTConfig(), max_tokens=2048, num_workers=4, pin_memory=False, "
            f"max_skip_fraction={max_skip_fraction})\n"
            "try:\n    for _ in loader: pass\nexcept TooManySkipped as e:\n    print('stopped:', e)\n")
    proc = run_python(code, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [s for s in proc.stdout.splitlines() if s.startswith("stopped:")][0]
    assert f"of rank 0, worker 0: {why}" in line and "first errors: class" in line, line
    # each bad file decoded and named once: the partition is not read again after it proved unreadable
    named = [s for s in proc.stderr.splitlines() if "skipping sample" in s]
    assert len(named) == len({s.split("skipping sample ")[1] for s in named}) <= 15


def test_one_bad_file_is_one_skip_named_once(tmp_path, caplog):
    folder = photo_folder(tmp_path / "data", 40)
    (folder / "class1" / "zz_corrupt.jpg").write_bytes(NOT_A_PHOTO)
    loader = APTLoader(folder, APTConfig(), max_tokens=4096, num_workers=0, transform=ImageTransform(224, augment=True))
    with caplog.at_level("WARNING"):
        for epoch in range(3):  # three passes over the folder
            loader.set_epoch(epoch)
            for _ in loader:
                pass
    assert loader.stats.num_skipped == 1 and loader.stats.skipped_keys == ["class1/zz_corrupt.jpg"]
    named = [r.getMessage() for r in caplog.records if "zz_corrupt" in r.getMessage()]
    assert named and all(m.count("zz_corrupt.jpg") == 1 for m in named), named


@pytest.mark.parametrize("workers", [0, 2])
def test_planned_ranks_yield_equal_batch_counts_when_whole_bins_are_bad(tmp_path, workers):
    folder = photo_folder(tmp_path / "data", 24)
    for name in ("class0/000_", "class1/001_", "class2/005_"):
        for p in folder.glob(name + "*"):
            p.write_bytes(NOT_A_PHOTO)
    counts, keys, skipped = [], [], 0
    for rank in range(2):  # one image per bin: every bad file is a bin of its own
        loader = APTLoader(folder, APTConfig(), max_tokens=1200, max_images=1, num_workers=workers, rank=rank,
                           world_size=2, packing="plan", max_skip_fraction=1.0, pin_memory=False)
        batches = [b for b, _ in loader]
        counts.append(len(batches))
        keys.append({k for b in batches for k in b.keys})
        assert len(batches) == loader.steps_per_epoch()
        skipped += loader.stats.num_skipped
    assert counts[0] == counts[1] == 12 and skipped == 3
    assert not any("000_" in k or "001_" in k or "005_" in k for ks in keys for k in ks)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_small_folder_sees_every_image_in_every_streamed_epoch(tmp_path, workers):
    folder = photo_folder(tmp_path / "data", 120)
    loader = APTLoader(folder, APTConfig(), max_tokens=4096, num_workers=workers, pin_memory=False,
                       transform=ImageTransform(224, augment=True, auto_augment="rand-m9-mstd0.5-inc1"))
    every = sorted(loader.source.keys)
    for epoch in range(3):  # a plain loop: iterating again starts the next epoch
        keys = [k for batch, _ in loader for k in batch.keys]
        assert sorted(keys) == every, f"epoch {epoch}: {len(set(keys))} of {len(every)} images"
        assert loader.stats.carried_over[epoch] == 0
    assert loader.steps_per_epoch() > 1
