"""`from_timm(name, pretrained=True, ...)` is timm's: here from a local file via ``pretrained_cfg_overlay``
(no network in tests), with timm's head reset for another ``num_classes``."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from apt_model import from_timm

ROOT = Path(__file__).resolve().parents[1]


def _saved_vit(tmp_path: Path) -> tuple[Path, dict]:
    import timm

    torch.manual_seed(3)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    path = tmp_path / "vit_tiny_local.pth"
    torch.save(vit.state_dict(), path)
    return path, vit.state_dict()


def test_pretrained_true_reads_a_local_file_through_timm(tmp_path):
    path, state = _saved_vit(tmp_path)
    apt = from_timm("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    own = apt.state_dict()
    for k, v in state.items():
        assert torch.equal(own[k], v), k
    random = from_timm("vit_tiny_patch16_224")  # pretrained defaults to False: not these weights
    assert not torch.equal(random.state_dict()["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])


def test_pretrained_with_another_num_classes_gets_a_new_head(tmp_path):
    path, state = _saved_vit(tmp_path)
    apt = from_timm("vit_tiny_patch16_224", pretrained=True, num_classes=10,
                    pretrained_cfg_overlay=dict(file=str(path)))
    own = apt.state_dict()
    assert own["head.weight"].shape == (10, 192)
    for k, v in state.items():
        if not k.startswith("head."):
            assert torch.equal(own[k], v), k


def test_train_pretrained_without_the_weights_is_one_line_and_status_2(tmp_path):
    import os
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # no network, an empty cache
    proc = subprocess.run([sys.executable, str(ROOT / "tools/train.py"), "--pretrained", "--steps", "1", "--no-eval",
                           "--workers", "0", "--output", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [l for l in proc.stderr.splitlines() if "error" in l]
    assert len(errors) == 1 and errors[0].startswith("train.py: error: --pretrained vit_tiny_patch16_224: timm could "
                                                     "not load its pretrained weights")


def test_a_checkpoint_of_another_resolution_gets_its_positions_resampled_as_timm_does(tmp_path):
    """A 224-px checkpoint fine-tuned at 160 px (the paper fine-tunes 224-px weights at 384): the
    position table is resampled like timm's own loader, and the uniform APT batch equals timm's forward."""
    import numpy as np
    import timm

    from apt_data import APTConfig, pack_images
    from apt_train.build import build_model
    from conftest import IMAGE_PATHS, load_resized, timm_input

    path, _ = _saved_vit(tmp_path)
    apt = build_model("vit_tiny_patch16_224", checkpoint=str(path), image_size=160).eval()
    ref = timm.create_model("vit_tiny_patch16_224", img_size=160, pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert apt.grid_size == (10, 10)
    assert torch.allclose(apt.state_dict()["pos_embed"], ref.state_dict()["pos_embed"], atol=1e-6)
    images = [load_resized(p, 160) for p in IMAGE_PATHS[:3]]
    batch = pack_images(images, APTConfig(thresholds=(-np.inf, -np.inf)), num_prefix_tokens=1)
    with torch.no_grad():
        assert torch.allclose(apt(batch), ref(timm_input(images, ref)), atol=1e-4)
