"""`studies/study_start.py --quick`: the large-token embedding ablation on a tiny slice, so the command cannot rot,
and `MixedLargeTokenEmbed` checked against its definition on a real photo.

The end-to-end test needs the DINOv2 ViT-S/14 weights of ``../shared/models`` (not part of the project:
skipped without them); the unit test uses a random-init timm ViT and runs everywhere.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from test_tools import run

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT.parent / "shared" / "models" / "vit_small_patch14_dinov2.imgfocus.fp16.safetensors"
IMAGES = sorted((ROOT / "tests" / "data" / "images").glob("*.JPEG"))


def test_mixed_embedding_is_resize_at_alpha_1_and_subpatch_mean_at_0(monkeypatch):
    import timm

    monkeypatch.syspath_prepend(str(ROOT / "studies"))  # as `python studies/study_start.py` runs: its folder first
    from study_start import MixedLargeTokenEmbed

    from apt_data import APTConfig, decode_image, pack_images
    from apt_model import from_timm

    torch.manual_seed(0)
    apt = from_timm(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)).eval()
    img = decode_image(str(ROOT / "tests" / "data" / "images" / "n03908714_pencil_sharpener.JPEG"), 256, multiple=16)
    batch = pack_images([img], APTConfig(patch_size=16, num_scales=3, thresholds=(7.0, 5.5)))
    base = apt.patch_embed
    for s in (1, 2):
        px = batch.pixels[s]
        assert px.shape[0] > 0, "the photo should have large tokens at both scales"
        g = 1 << s
        with torch.no_grad():
            resized = base(px, s, resize_only=True)
            assert torch.equal(MixedLargeTokenEmbed(base, 1.0)(px, s), resized)
            # each sub-patch cut out by hand and embedded alone, then averaged
            subs = [base(px[:, :, i * 16:(i + 1) * 16, j * 16:(j + 1) * 16].contiguous(), 0)
                    for i in range(g) for j in range(g)]
            mean = torch.stack(subs).mean(0)
            torch.testing.assert_close(MixedLargeTokenEmbed(base, 0.0)(px, s), mean, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(MixedLargeTokenEmbed(base, 0.25)(px, s), 0.25 * resized + 0.75 * mean,
                                       rtol=1e-5, atol=1e-5)
            assert not torch.allclose(resized, mean, atol=1e-3)  # the two embeddings really differ
    assert torch.equal(MixedLargeTokenEmbed(base, 0.0)(batch.pixels[0], 0), base(batch.pixels[0], 0))


@pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"the study's pretrained weights {WEIGHTS} are absent "
                                                  "(../shared is not part of the project)")
def test_study_start_quick_writes_table(tmp_path):
    data = tmp_path / "data"
    for i, p in enumerate(IMAGES[:20]):  # 10 classes x 2 images (labels are arbitrary: a smoke test)
        d = data / f"class{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        os.symlink(p, d / p.name)
    out = tmp_path / "results"
    printed = run(ROOT / "studies" / "study_start.py", "--quick", "--data", data, "--output", out,
                  "--cache", tmp_path / "cache", timeout=300)
    assert "sub-patch mean" in (out / "start.md").read_text() and "| thresholds |" in printed
    rows = json.loads((out / "start.json").read_text())["rows"]
    assert [r["alpha"] for r in rows] == [None, 1.0, 0.5, 0.0]
    assert len({r["fraction"] for r in rows[1:]}) == 1 and rows[1]["fraction"] < 1  # equal tokens, fewer than vanilla
    for r in rows[1:]:
        hits, ref = np.array(r["hits"]), np.array(rows[0]["hits"])
        assert r["delta"] == pytest.approx(hits.mean() - ref.mean()) and r["delta_se"] >= 0
