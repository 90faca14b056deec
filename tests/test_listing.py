"""Non-image files of an image folder (issue 24.6): left out as torchvision's ImageFolder does, but
counted by extension, in one warning when a folder is listed for training and in make_shards' summary."""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from PIL import Image

from apt_data.listing import list_image_folder
from apt_data.shards import build as ms
from apt_data.sources.folder import FolderSource
from conftest import IMAGE_PATHS

ROOT = Path(__file__).resolve().parents[1]


def folder_with_extras(root: Path) -> Path:
    """6 photos in 2 classes, plus 2 GIFs (real images, an extension torchvision does not list), a
    .txt, a file without extension and a hidden file (ignored, not counted)."""
    for k, p in enumerate(IMAGE_PATHS[:6]):
        (root / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / f"c{k % 2}" / p.name)
    for k in range(2):
        with Image.open(IMAGE_PATHS[k]) as im:
            im.convert("RGB").save(root / f"c{k}" / f"anim{k}.GIF")
    (root / "c0" / "notes.txt").write_text("labels checked\n")
    (root / "c1" / "LICENSE").write_text("CC-BY\n")
    (root / "c1" / ".DS_Store").write_bytes(b"\0")
    return root


def test_listing_counts_left_out_files_by_extension(tmp_path, caplog):
    root = folder_with_extras(tmp_path / "data")
    left_out: Counter = Counter()
    with caplog.at_level(logging.WARNING, logger="apt_data.listing"):
        entries = list_image_folder(root, left_out)
    assert len(entries) == 6 and all(p.suffix == ".JPEG" for p, _, _ in entries)
    assert left_out == {".gif": 2, ".txt": 1, "": 1}
    assert not caplog.records  # the caller reports them

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="apt_data.listing"):
        src = FolderSource(root)  # listed for training: one warning
    assert len(src) == 6
    assert [r.getMessage() for r in caplog.records] == [
        f"{root}: 4 non-image files left out (.gif 2, (none) 1, .txt 1): only .jpg .jpeg .png .ppm .bmp .pgm .tif "
        ".tiff .webp are listed"]

    caplog.clear()
    for f in (root / "c0" / "notes.txt", root / "c1" / "LICENSE", *root.glob("c*/*.GIF")):
        f.unlink()
    with caplog.at_level(logging.WARNING, logger="apt_data.listing"):
        FolderSource(root)
    assert not caplog.records  # nothing left out: nothing said


def test_make_shards_summary_counts_left_out_files(tmp_path):
    root = folder_with_extras(tmp_path / "data")
    res = ms.build_shards(root, tmp_path / "out", image_size=64, shard_size=4, workers=1, progress=False)
    assert res.num_samples == 6 and res.left_out == {".gif": 2, ".txt": 1, "": 1}
    assert "; 4 non-image files left out (.gif 2, (none) 1, .txt 1); index " in res.summary()
    # the user's command prints it
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), str(root), str(tmp_path / "out2"),
                          "--image-size", "64", "--shard-size", "4", "--workers", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "6 samples in 2 shards" in out.stderr and "4 non-image files left out (.gif 2, (none) 1, .txt 1)" in out.stderr
