"""`studies/study_dense.py --quick`: every stage of the dense study (head fit, frozen rows of every baseline,
the fine-tune arms, the report) on 2 CamVid images and 1 step, with the linear head and then the conv head in the
same cache (their results never mix; the report labels both), so the command cannot rot; and the study's
augmentation keeps image and mask aligned (a real photo with a synthetic colour-range mask).

The study needs ``../shared/models`` (DINOv2 weights) and ``../shared/data/camvid``; neither is part of the
project, so that test skips, naming the missing path, where either is absent.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import IMAGE_PATHS, load_resized
from test_tools import run

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT.parent / "shared" / "models" / "vit_small_patch14_dinov2.imgfocus.fp16.safetensors"
CAMVID = ROOT.parent / "shared" / "data" / "camvid"


def test_study_dense_quick(tmp_path):
    for need, what in ((WEIGHTS, "weights"), (CAMVID, "CamVid data")):
        if not need.exists():
            pytest.skip(f"the study's {what} {need} are absent (../shared is not part of the project)")
    out, cache = tmp_path / "dense", tmp_path / "cache"
    run(ROOT / "studies" / "study_dense.py", "--quick", "--output", out, "--cache", cache, timeout=600)
    md = (out / "dense.md").read_text()
    assert "studies/study_dense.py --quick" in md and "| stage | size | method |" in md
    assert (out / "dense.png").stat().st_size > 1000 and (out / "overlays.png").stat().st_size > 1000
    rows = json.loads((out / "dense.json").read_text())["rows"]
    got = {(r["stage"], r["method"]) for r in rows}
    assert got == {("frozen", m) for m in ("full grid", "APT entropy", "APT laplacian", "APT upsample", "random drop",
                                          "lower resolution")} | {("fine-tuned", m) for m in
                                                                  ("full grid", "APT entropy", "lower resolution")}
    for r in rows:
        assert 0 <= r["miou"] <= 1 and 0 < r["fraction"] <= 1 and r["flop_ratio"] > 0 and r["n"] == 2
        assert r["method"] == "full grid" or "delta_se" in r
    apt = next(r for r in rows if r["stage"] == "frozen" and r["method"] == "APT entropy")
    low = next(r for r in rows if r["stage"] == "frozen" and r["method"] == "lower resolution")
    assert apt["fraction"] < 0.8 and abs(low["tokens_per_image"] - apt["tokens_per_image"]) / apt["tokens_per_image"] < 0.1
    assert "vs_low_se" in apt
    ft = [r for r in rows if r["stage"] == "fine-tuned"]
    assert all(r["steps"] == 1 and r["train_images_per_s"] > 0 for r in ft)
    # a rerun reads every stage back from the cache (nothing trained again)
    printed = run(ROOT / "studies" / "study_dense.py", "--quick", "--output", out, "--cache", cache, timeout=600)
    assert "frozen 448x336: read back" in printed and printed.count("read back") == 4
    assert {r.get("head") for r in rows} == {"linear"}

    # the conv head in the same cache: everything computed afresh (its own cache names), the report holds both
    printed = run(ROOT / "studies" / "study_dense.py", "--quick", "--head", "conv", "--output", out, "--cache", cache,
                  timeout=600)
    assert "read back" not in printed
    assert (cache / "frozen-448x336-conv.json").is_file() and (cache / "head-448x336-conv.pt").is_file()
    assert len(list(cache.glob("ft-*-448x336-conv.json"))) == 3 and len(list(cache.glob("ft-*-448x336.json"))) == 3
    both = json.loads((out / "dense.json").read_text())["rows"]
    assert [r["head"] for r in both] == ["conv"] * len(rows) + ["linear"] * len(rows)  # the run's head first
    conv = both[:len(rows)]
    assert {(r["stage"], r["method"]) for r in conv} == got
    lin_apt = next(r for r in both[len(rows):] if r["stage"] == "frozen" and r["method"] == "APT entropy")
    assert lin_apt["miou"] == apt["miou"] and lin_apt["vs_low"] == apt["vs_low"]  # linear rows unchanged
    conv_apt = next(r for r in conv if r["stage"] == "frozen" and r["method"] == "APT entropy")
    assert conv_apt["miou"] != apt["miou"]
    md = (out / "dense.md").read_text()
    assert "### Frozen, 448x336, conv head" in md and "### Frozen, 448x336, linear head" in md
    assert "| frozen | 448x336 | APT entropy | conv |" in md and "| frozen | 448x336 | APT entropy | linear |" in md


def test_study_augmentation_keeps_image_and_mask_aligned(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "studies"))  # the study's own modules, as its script imports them
    import dense_parts as dp

    # an image that *is* its mask in colours: after the transform, the image's colours must still name the
    # mask's labels (bicubic blends a thin band at label edges; a misaligned or unflipped mask fails broadly)
    photo = load_resized(IMAGE_PATHS[6], (120, 160))
    mask = photo.argmax(-1).astype(np.uint8)
    colours = np.array([[250, 0, 0], [0, 250, 0], [0, 0, 250]], np.uint8)
    img = colours[mask]
    for seed in range(6):
        a, m = dp.augment(img, mask, (112, 84), np.random.default_rng(seed))
        assert a.shape == (84, 112, 3) and m.shape == (84, 112)
        lab = m != dp.IGNORE
        assert lab.mean() > 0.5
        assert (a[~lab] == 0).all()  # padding: black image, ignored mask
        agree = (a[lab].argmax(-1) == m[lab]).mean()
        assert agree > 0.9, (seed, agree)
