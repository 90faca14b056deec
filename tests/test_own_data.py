"""docs/own-data.md runs start to finish on a tiny copy: every bash command of it, in a temporary
folder holding a 3-class ``photos/{train,val}``, with the long settings swapped for tiny ones (each
swap must apply, so the page and this test cannot drift apart) and no network (the checkpoint is
random weights saved the way the page saves the downloaded ones)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "own-data.md"

TINY = {  # what the page says -> what the test runs
    "pretrained=True": "pretrained=False",  # no network in tests: random weights, saved the same way
    "--epochs 30 --warmup-epochs 3": "--steps 2 --workers 0 --max-tokens 2048 --quiet",
    "--baseline none resize random --uniform": "--baseline none resize random --uniform --workers 0",
    "python tools/": f"{sys.executable} {ROOT}/tools/",
    "python -c": f"{sys.executable} -c",
}


def bash_blocks(text: str) -> list[str]:
    return [b.replace("\\\n", " ") for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def photos(root: Path) -> None:
    """3 classes (cat, dog, fish) of 4 training and 2 val images, as .jpg."""
    images = sorted((ROOT / "tests/data/images").glob("*.JPEG"))
    for c, name in enumerate(["cat", "dog", "fish"]):
        for i, img in enumerate(images[6 * c:6 * c + 6]):
            d = root / "photos" / ("val" if i >= 4 else "train") / name
            d.mkdir(parents=True, exist_ok=True)
            shutil.copy(img, d / f"{img.stem}.jpg")


def test_own_data_page_runs_start_to_finish(tmp_path):
    photos(tmp_path)
    script = "\n".join(bash_blocks(PAGE.read_text()))
    for long, tiny in TINY.items():
        assert long in script, f"docs/own-data.md no longer says {long!r}: update TINY"
        script = script.replace(long, tiny)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "photos/val:\ncat\ndog\nfish" in out  # the ls of step 1
    assert "train data photos/train: 12 images, 3 classes; val data " in out and "head: 3 classes" in out
    run = tmp_path / "out" / "photos"
    assert list(run.glob("checkpoint-*.pt")) and (run / "curves.png").is_file()
    results = json.loads((run / "eval.json").read_text())["results"]
    assert set(results) == {"none", "resize", "random", "uniform"} and results["none"]["images"] == 6
    assert len(list((run / "layouts").glob("*.layout.png"))) == 2


def test_a_photo_decoded_at_its_own_size_is_cut_to_the_patch_grid():
    """`decode_image(path, multiple=16)` without a size: the centre, cut down to multiples of 16."""
    import numpy as np

    from apt_data import APTConfig
    from apt_data.image import decode_image

    path = sorted((ROOT / "tests/data/images").glob("*.JPEG"))[0]
    full = decode_image(path)
    cut = decode_image(path, multiple=16)
    h, w = full.shape[:2]
    assert cut.shape == (h - h % 16, w - w % 16, 3) and (h % 16 or w % 16)
    top, left = (h % 16) // 2, (w % 16) // 2
    assert np.array_equal(cut, full[top:top + cut.shape[0], left:left + cut.shape[1]])
    from apt_data import patchify

    patchify(cut, APTConfig())  # takes it (the uncut image it rejects)
