"""``--task segmentation`` end to end: training through ``tools/train.py`` on an image + mask folder in
ADE20K's layout (the repository's photos, masks from their colour ranges), evaluation at the end, the
checkpoint evaluated by ``tools/evaluate.py --task segmentation`` and loaded back by ``--initial-checkpoint``."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apt_train import cli
from apt_train.config import SetupError
from test_dense_data import write_pairs

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--task", "segmentation", "--model", "vit_tiny_patch16_224", "--img-size", "64", "--workers", "0",
         "--max-tokens", "128", "--num-classes", "8", "--device", "cpu", "--quiet", "--save-every", "0"]


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade")
    write_pairs(root, "train", 6)
    write_pairs(root, "val", 3, offset=6)
    return root


def run_tool(name: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_train_then_evaluate_segmentation(ade_root, tmp_path):
    out = tmp_path / "run"
    p = run_tool("train", *FLAGS, "--data", ade_root, "--steps", "3", "--output", out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "final val: mIoU" in p.stderr, p.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    assert len(train) == 3 and all(r["loss"] > 0 for r in train)
    assert val and val[-1]["images"] == 3 and 0.0 <= val[-1]["miou"] <= 1.0
    assert len(val[-1]["per_class_iou"]) == 8
    ckpt = sorted(out.glob("checkpoint-*.pt"))[-1]
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["task"]["task"] == "segmentation" and state["task"]["num_classes"] == 8
    assert any(k.startswith("head.") for k in state["model"]) and any(k.startswith("backbone.") for k in state["model"])

    # the checkpoint evaluates through tools/evaluate.py (no --num-classes: the checkpoint's), to the trainer's mIoU
    js = tmp_path / "seg.json"
    e = run_tool("evaluate", "--task", "segmentation", "--checkpoint", ckpt, "--data", ade_root, "--img-size", "64",
                 "--workers", "0", "--max-tokens", "128", "--device", "cpu", "--output", js)
    assert e.returncode == 0, e.stderr[-3000:]
    assert "mIoU" in e.stdout and "per-class IoU" in e.stdout and "pixel accuracy" in e.stdout
    res = json.loads(js.read_text())["results"]["segmentation"]
    assert res["miou"] == pytest.approx(val[-1]["miou"], abs=1e-6)
    assert res["pixel_accuracy"] == pytest.approx(val[-1]["pixel_accuracy"], abs=1e-6)

    # --initial-checkpoint loads backbone and head back: before any step the weights are the checkpoint's
    trainer = cli.make_trainer([*FLAGS, "--data", str(ade_root), "--steps", "1", "--output", str(tmp_path / "again"),
                                "--initial-checkpoint", str(ckpt)])
    own = trainer.model.state_dict()
    for k, v in state["model"].items():
        torch.testing.assert_close(own[k].cpu(), v, msg=k)


def test_masks_flag_and_schedule_groups(ade_root, tmp_path):
    """``--data IMAGES --masks MASKS``: no val split beside it (none evaluated); the head and APT's detail
    path train at the full lr, the backbone's blocks at the recipe's layer decay."""
    trainer = cli.make_trainer([*FLAGS, "--data", str(ade_root / "images" / "train"), "--masks",
                                str(ade_root / "annotations" / "train"), "--steps", "1", "--layer-decay", "0.5",
                                "--output", str(tmp_path / "m")])
    assert trainer.val_loader is None and len(trainer.loader.source) == 6
    scales = {id(p): g["lr_scale"] for g in trainer.optimizer.param_groups for p in g["params"]}
    m = trainer.model
    assert all(scales[id(p)] == 1.0 for p in m.head.parameters())
    assert all(scales[id(p)] == 1.0 for n, p in m.backbone.named_parameters() if n.startswith("patch_embed.down."))
    assert scales[id(m.backbone.blocks[0].mlp.fc1.weight)] < scales[id(m.backbone.blocks[-1].mlp.fc1.weight)] < 1.0
    assert len(scales) == sum(1 for p in m.parameters() if p.requires_grad)
    result = trainer.fit()
    assert result.global_step == 1 and result.final_eval is None


def test_segmentation_needs_the_class_count(ade_root, tmp_path):
    flags = [f for f in FLAGS if f not in ("--num-classes", "8")]
    with pytest.raises(SetupError, match="--num-classes"):
        cli.make_trainer([*flags, "--data", str(ade_root), "--steps", "1", "--output", str(tmp_path / "x")])
