"""`studies/study_hires.py --quick`: the label-free high-resolution study on 2 photos at 448 px, so the command
cannot rot and its comparison is checked (the APT path with no large patches equals the timm reference).

Needs ``../shared/models`` (the DINOv2 ViT-S/14 weights) and ``../shared/data/hires-photos``; neither is part
of the project, so the test skips, naming the missing path, where either is absent.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_tools import run

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT.parent / "shared" / "models" / "vit_small_patch14_dinov2.imgfocus.fp16.safetensors"
PHOTOS = ROOT.parent / "shared" / "data" / "hires-photos"


def test_study_hires_quick(tmp_path):
    for need, what in ((WEIGHTS, "weights"), (PHOTOS, "high-resolution photos")):
        if not need.exists():
            pytest.skip(f"the study's {what} {need} are absent (../shared is not part of the project)")
    out = tmp_path / "results"
    printed = run(ROOT / "studies" / "study_hires.py", "--quick", "--output", out)
    md = (out / "hires.md").read_text()
    assert "studies/study_hires.py --quick" in md and "| size | method |" in md
    assert (out / "hires.png").stat().st_size > 1000
    res = json.loads((out / "hires.json").read_text())
    assert len(res["photos"]) == 2
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"full resolution (reference)", "vanilla, APT path", "APT entropy", "lower resolution",
                         "random drop"}
    for r in res["rows"]:
        assert r["size"] == 448 and 0 < r["fraction"] <= 1 and r["flop_ratio"] > 0
        for p in r["per_photo"]:
            assert -1 <= p["cls"] <= 1 + 1e-9 and -1 <= p["dense"] <= 1 + 1e-9
    # the APT model with no large patches is the full-resolution model: cosine 1 per photo
    for p in rows["vanilla, APT path"]["per_photo"]:
        assert abs(p["cls"] - 1) < 1e-4 and abs(p["dense"] - 1) < 1e-4, p
    apt, low, rnd = rows["APT entropy"], rows["lower resolution"], rows["random drop"]
    assert apt["fraction"] < 1 and apt["flop_ratio"] < 1
    assert [p["tokens"] for p in rnd["per_photo"]] == [p["tokens"] for p in apt["per_photo"]]  # APT's count
    # lower resolution: the per-photo square closest to APT's count (within one grid row/column)
    for a, b in zip(apt["per_photo"], low["per_photo"]):
        assert b["px"] % 14 == 0 and abs(b["px"] // 14 - a["tokens"] ** 0.5) <= 0.5 + 1e-9
    assert "cls_vs_low" in apt and "| 448 | APT entropy |" in printed
