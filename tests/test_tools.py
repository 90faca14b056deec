"""The command-line tools run on the shipped data and write what they promise."""
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from apt_data.visualize import SCALE_COLORS
from conftest import IMAGE_PATHS

ROOT = Path(__file__).resolve().parents[1]


def run(*args, timeout=240, stream="stdout"):
    """The script's ``stream``: stdout, or for a command's log lines stderr."""
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return getattr(proc, stream)


def test_visualize_writes_layout_pngs(tmp_path):
    out = run(ROOT / "tools/visualize.py", IMAGE_PATHS[0], IMAGE_PATHS[5], "--out", tmp_path, "--size", "224", stream="stderr")
    pngs = sorted(tmp_path.glob("*.layout.png"))
    assert len(pngs) == 2
    swatch = np.round(np.asarray(SCALE_COLORS[1])).astype(np.uint8)  # the 2x patches' tint, in the legend
    for png in pngs:
        im = np.asarray(Image.open(png))
        assert im.ndim == 3 and im.shape[0] > 224 + 40 and im.shape[1] >= 224  # the layout, its caption, the legend
        assert (im == 255).all(axis=2).any()  # white patch borders are drawn
        assert (im[-30:] == swatch).all(axis=2).any()  # the legend strip below the layout has the 2x swatch
    assert "tokens" in out and "total:" in out and not list(tmp_path.glob("*.tmp*"))


def test_visualize_keeps_same_named_images_from_different_folders_apart(tmp_path):
    import shutil

    src = tmp_path / "photos"
    for folder, image in (("cats", IMAGE_PATHS[0]), ("dogs", IMAGE_PATHS[5])):
        (src / folder).mkdir(parents=True)
        shutil.copy(image, src / folder / "img_001.jpg")
    shutil.copy(IMAGE_PATHS[7], src / "cats" / "img_001.png")
    shutil.copy(IMAGE_PATHS[9], src / "cats" / "other.jpg")
    inputs = [src / "cats/img_001.jpg", src / "dogs/img_001.jpg", src / "cats/img_001.png", src / "cats/other.jpg"]
    out = run(ROOT / "tools/visualize.py", *inputs, "--out", tmp_path / "out", "--size", "64")
    names = sorted(p.name for p in (tmp_path / "out").glob("*.layout.png"))
    assert names == ["cats__img_001.jpg.layout.png", "cats__img_001.png.layout.png", "dogs__img_001.layout.png",
                     "other.layout.png"], out
    drawn = [np.asarray(Image.open(tmp_path / "out" / n)) for n in names[:3]]
    assert not np.array_equal(drawn[0], drawn[2])  # each file holds its own image


def test_visualize_rejects_bad_thresholds(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools/visualize.py"), str(IMAGE_PATHS[0]), "--out", str(tmp_path),
                           "--thresholds", "5.5"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "one value per scale" in proc.stderr


def test_demo_runs_the_loader_on_the_sample_shards(tmp_path):
    out = run(ROOT / "examples/demo.py", "--out", tmp_path, "--workers", "2")
    assert "400 images from" in out and "planned from exact index token counts" in out
    total = [l for l in out.splitlines() if l.startswith("total:")][0]
    assert "400 images" in total and "of the uniform grid" in total
    assert (tmp_path / "layouts.png").is_file()


def test_bench_fill_quick_streams_fuller_batches_than_upper_bound_plans():
    out = run(ROOT / "benchmarks/bench_loader.py", "--fill", "--quick", "--epochs", "1")
    assert out.startswith("# command: ") and "bench_loader.py --fill --quick --epochs 1" in out.splitlines()[0]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in out.splitlines() if line.startswith("| ")}
    shards = rows["sample `shards/`, 224 px, 4,096 tokens, augmented training"]
    stream_fill, plan_fill = float(shards[4].strip("*%")), float(shards[7].split("%")[0])
    assert stream_fill > 97 and plan_fill < 80  # real token counts against uniform-grid upper bounds
    assert int(shards[6]) > 0  # the epoch ended mid-pass: samples carry over
    evaluation = next(v for k, v in rows.items() if k.startswith("eval `shards/:val`"))
    assert evaluation[2] == "100" and "every sample once per epoch" in evaluation[-1]
