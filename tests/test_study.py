"""`studies/study.py --quick`: every stage of the issue-14 study on a tiny slice, so the command cannot rot.

Needs the DINOv2 ViT-S/14 weights of ``../shared/models`` (not part of the project: skipped without
them). The images are the test photos of ``tests/data/images``, spread over 10 class folders, so
``../shared/data`` is not needed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from test_tools import run

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT.parent / "shared" / "models" / "vit_small_patch14_dinov2.imgfocus.fp16.safetensors"
IMAGES = sorted((ROOT / "tests" / "data" / "images").glob("*.JPEG"))


@pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"the study's pretrained weights {WEIGHTS} are absent "
                                                  "(../shared is not part of the project)")
def test_study_quick_writes_table_plot_json(tmp_path):
    data = tmp_path / "data"
    for i, p in enumerate(IMAGES[:20]):  # 10 classes x 2 images (labels are arbitrary: a smoke test)
        d = data / f"class{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        os.symlink(p, d / p.name)
    out, cache = tmp_path / "results", tmp_path / "cache"
    printed = run(ROOT / "studies" / "study.py", "--quick", "--data", data, "--output", out, "--cache", cache, timeout=300)
    md = (out / "study.md").read_text()
    assert "studies/study.py --quick" in md and "| stage | method |" in md
    assert (out / "study.png").stat().st_size > 1000
    res = json.loads((out / "study.json").read_text())
    methods = {(r["stage"], r["method"]) for r in res["rows"]}
    for m in ("vanilla", "APT entropy", "APT laplacian", "random drop", "lower resolution", "resize-only"):
        assert ("zero-shot", m) in methods, m
    assert any(m == "vanilla control" for _, m in methods) and any(
        s.startswith("fine-tuned") and m == "APT entropy" for s, m in methods)
    for r in res["rows"]:
        assert 0 <= r["top1"] <= 1 and r["se"] >= 0 and r["images_per_s"] > 0 and 0 < r["fraction"] <= 1
        assert len(r["hits"]) == r["n"] and sum(r["hits"]) == round(r["top1"] * r["n"])
        if r["method"] in ("vanilla", "vanilla control"):
            assert r["delta"] is None or r["delta"] == 0  # the reference row of its stage
        else:  # paired against its stage's reference on the same images
            ref = next(q for q in res["rows"] if q["stage"] == r["stage"] and q["method"].startswith("vanilla"))
            assert r["delta"] == pytest.approx(r["top1"] - ref["top1"]) and r["delta_se"] >= 0
    # the starting classifier is a plain timm checkpoint with a 10-class head
    import torch
    sd = torch.load(cache / "start-classifier.pth", weights_only=True)
    assert sd["head.weight"].shape == (10, 384) and sd["pos_embed"].shape == (1, 257, 384)
    assert "| zero-shot | vanilla |" in printed
