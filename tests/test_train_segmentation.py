"""``--task segmentation`` end to end: training through ``tools/train.py`` on an image + mask folder in
ADE20K's layout (the repository's photos, masks from their colour ranges) or on shards with masks built from
it, evaluation at the end, the checkpoint evaluated by ``tools/evaluate.py --task segmentation`` and loaded
back by ``--initial-checkpoint``; the head (``--head linear|conv``) kept in the checkpoint."""
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
    assert "| method | mIoU | pixel acc |" in e.stdout and "\n| APT | " in e.stdout and "per-class IoU, APT" in e.stdout
    res = json.loads(js.read_text())["results"]["none"]
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


def test_conv_head_trains_saves_and_rebuilds_from_the_checkpoint(ade_root, tmp_path):
    """``--head conv``: the trainer builds `ConvSegHead`, the checkpoint's task state names it, and apt-eval and
    ``--initial-checkpoint`` rebuild it without ``--head`` (the same weights, the trainer's mIoU); an explicit
    other ``--head`` starts a new head on the checkpoint's backbone."""
    from apt_model.heads import ConvSegHead, LinearSegHead

    out = tmp_path / "conv"
    trainer = cli.make_trainer([*FLAGS, "--head", "conv", "--data", str(ade_root), "--steps", "3",
                                "--output", str(out)])
    assert isinstance(trainer.model.head, ConvSegHead)
    result = trainer.fit()
    assert result.global_step == 3 and result.final_eval is not None
    ckpt = sorted(out.glob("checkpoint-*.pt"))[-1]
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["task"]["head"] == "conv" and any(k.startswith("head.blocks.") for k in state["model"])

    js = tmp_path / "conv.json"
    e = run_tool("evaluate", "--task", "segmentation", "--checkpoint", ckpt, "--data", ade_root, "--img-size", "64",
                 "--workers", "0", "--max-tokens", "128", "--device", "cpu", "--output", js)
    assert e.returncode == 0, e.stderr[-3000:]
    assert "conv head" in e.stderr  # the header is a log line
    assert json.loads(js.read_text())["results"]["none"]["miou"] == pytest.approx(
        result.final_eval.metrics.miou, abs=1e-6)

    again = cli.make_trainer([*FLAGS, "--data", str(ade_root), "--steps", "1", "--output", str(tmp_path / "a"),
                              "--initial-checkpoint", str(ckpt)])
    assert isinstance(again.model.head, ConvSegHead)
    own = again.model.state_dict()
    for k, v in state["model"].items():
        torch.testing.assert_close(own[k].cpu(), v, msg=k)

    other = cli.make_trainer([*FLAGS, "--head", "linear", "--data", str(ade_root), "--steps", "1",
                              "--output", str(tmp_path / "b"), "--initial-checkpoint", str(ckpt)])
    assert isinstance(other.model.head, LinearSegHead)
    torch.testing.assert_close(other.model.backbone.state_dict()["blocks.0.mlp.fc1.weight"].cpu(),
                               state["model"]["backbone.blocks.0.mlp.fc1.weight"])


def test_bad_head_is_a_usage_error(ade_root, tmp_path):
    with pytest.raises(SystemExit):
        cli.make_trainer([*FLAGS, "--head", "upernet", "--data", str(ade_root), "--steps", "1",
                          "--output", str(tmp_path / "x")])


@pytest.fixture(scope="module")
def mask_shards(ade_root, tmp_path_factory):
    """Shards with masks (``.seg.png`` members) of the fixture's train and val splits, in one folder."""
    from apt_data import APTConfig
    from apt_data.shards.build import build_shards

    out = tmp_path_factory.mktemp("segshards")
    for split, n in (("train", 6), ("val", 3)):
        res = build_shards(ade_root / "images" / split, out, masks=ade_root / "annotations" / split, prefix=split,
                           image_size=64, crop=False, shard_size=4, cfg=APTConfig(patch_size=16, num_scales=3),
                           workers=1, progress=False)
        assert res.num_samples == n and res.stats.num_skipped == 0
    return out


def test_train_and_evaluate_on_shards_with_masks(mask_shards, tmp_path):
    """``--data SHARDS``: the train split, its val split beside it evaluated (as classification's shards); the
    checkpoint evaluates on the shards' val split through tools/evaluate.py to the trainer's mIoU."""
    from apt_data.sources import IndexSource

    out = tmp_path / "run"
    trainer = cli.make_trainer([*FLAGS, "--data", str(mask_shards), "--steps", "3", "--output", str(out)])
    assert isinstance(trainer.loader.source, IndexSource) and len(trainer.loader.source) == 6
    assert trainer.config.data.val == f"{mask_shards}:val" and len(trainer.val_loader.source) == 3
    batch, _ = next(iter(trainer.loader))
    assert batch.num_images > 0 and all(tuple(batch.mask(i).shape) == tuple(batch.mask_sizes[i])
                                        for i in range(batch.num_images))
    result = trainer.fit()
    assert result.global_step == 3 and result.final_eval.images == 3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split") == "train"]
    assert len(train) == 3 and all(r["loss"] > 0 for r in train)

    ckpt = sorted(out.glob("checkpoint-*.pt"))[-1]
    js = tmp_path / "seg.json"
    e = run_tool("evaluate", "--task", "segmentation", "--checkpoint", ckpt, "--data", mask_shards, "--img-size", "64",
                 "--workers", "0", "--max-tokens", "128", "--device", "cpu", "--output", js)
    assert e.returncode == 0, e.stderr[-3000:]
    assert "(3 images)" in e.stderr  # the header is a log line
    res = json.loads(js.read_text())["results"]["none"]
    assert res["miou"] == pytest.approx(result.final_eval.metrics.miou, abs=1e-6)


def test_shards_without_masks_or_with_relabelling_are_setup_errors(mask_shards, tmp_path):
    with pytest.raises(SetupError, match="no mask member"):
        cli.make_trainer([*FLAGS, "--data", str(REPO / "shards"), "--steps", "1", "--output", str(tmp_path / "a")])
    with pytest.raises(SetupError, match="--void / --reduce-zero-label"):
        cli.make_trainer([*FLAGS, "--data", str(mask_shards), "--void", "3", "--steps", "1",
                          "--output", str(tmp_path / "b")])
    with pytest.raises(SetupError, match="no index nope.parquet"):
        cli.make_trainer([*FLAGS, "--data", f"{mask_shards}:nope", "--steps", "1", "--output", str(tmp_path / "c")])


def test_evaluate_segmentation_baselines(ade_root, tmp_path, capsys):
    """``apt-eval --task segmentation --baseline none resize random lowres --uniform``: a row per method with mIoU
    and tokens; random keeps APT's count per image, lowres the full grid nearest APT's count, uniform every cell."""
    from apt_train.commands.evaluate import main

    js = tmp_path / "base.json"
    rc = main(["--task", "segmentation", "--num-classes", "8", "--data", str(ade_root), "--img-size", "160",
               "--thresholds", "7.0", "5.5", "--baseline", "random", "lowres", "resize", "--uniform", "--workers", "0",
               "--max-tokens", "512", "--device", "cpu", "--output", str(js)])
    assert rc == 0
    printed = capsys.readouterr().out
    rows = {line.split(" | ")[0][2:]: line for line in printed.splitlines() if line.startswith("| ") and "%" in line}
    assert list(rows)[0] == "APT" and set(rows) >= {"APT", "random (nearest fill)", "resize", "uniform"}
    assert any(name.startswith("lower resolution (") for name in rows) and len(rows) == 5
    res = json.loads(js.read_text())["results"]
    assert list(res) == ["none", "random", "lowres", "resize", "uniform"]
    apt, rnd, low, uni = res["none"], res["random"], res["lowres"], res["uniform"]
    for r in res.values():
        assert r["images"] == 3 and 0 <= r["miou"] <= 1 and r["gflops_per_image"] > 0
        assert r["full_grid_tokens_per_image"] == uni["tokens_per_image"]  # every row against the full-size grid
    assert apt["token_fraction"] < 0.9 and rnd["tokens_per_image"] == apt["tokens_per_image"]
    assert res["resize"]["tokens_per_image"] == apt["tokens_per_image"] and uni["token_fraction"] == 1.0
    assert low["short_side"] < 160 and abs(low["tokens_per_image"] - apt["tokens_per_image"]) < 0.15 * apt["tokens_per_image"]
    assert rnd["miou"] != apt["miou"] or rnd["pixel_accuracy"] != apt["pixel_accuracy"]
    with pytest.raises(SystemExit):
        main(["--baseline", "lowres", "--device", "cpu"])
