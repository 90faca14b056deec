"""A folder smaller than a step (docs/own-data.md's command on a tiny set): the lr rule counts the images
a step can really hold, a warm-up in epochs never fills the run, evaluations stay a handful of steps
apart, and the epoch records say how many images and passes an epoch was."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from apt_train import cli  # noqa: E402
from apt_train.metrics import read_jsonl  # noqa: E402


def folder(root: Path, classes: int = 2, per_class: int = 4) -> Path:
    images = sorted((ROOT / "tests/data/images").glob("*.JPEG"))
    for c in range(classes):
        d = root / "photos" / "train" / f"class{c}"
        d.mkdir(parents=True)
        for img in images[c * per_class:(c + 1) * per_class]:
            shutil.copy(img, d / f"{img.stem}.jpg")
    return root / "photos" / "train"


def test_a_folder_smaller_than_a_step(tmp_path, caplog):
    train = folder(tmp_path)  # 8 photos: one 2,048-token step holds them all
    base = ["--data", str(train), "--val-data", str(train), "--recipe", "full", "--mixup", "0", "--cutmix", "0",
            "--max-tokens", "2048", "--workers", "0", "--quiet", "--output", str(tmp_path / "out")]
    trainer = cli.make_trainer(base + ["--epochs", "30", "--warmup-epochs", "3"])  # docs/own-data.md's
    assert trainer.steps_per_epoch == 1 and trainer.total_steps == 30
    assert trainer.loader.mean_images_per_batch() > 8 and trainer.images_per_step == 8  # what a step can hold
    assert trainer.lr == pytest.approx(1.5e-3 * 8 / 256)
    assert trainer.scheduler.warmup_steps == 3 and trainer.eval_epochs == 5

    with caplog.at_level("INFO", logger="apt_train"):
        res = cli.run(base + ["--epochs", "12", "--warmup-epochs", "12"])  # a warm-up as long as the run
    assert res.global_step == 12
    out = "\n".join(caplog.messages)  # the run's log lines
    assert "the token budget fits" in out and "but the training data has 8: the lr is scaled for 8 images" in out
    assert "warm-up: 12 epochs are 12 steps of the run's 12: capped at 6 steps (half the run)" in out
    assert "evaluates every 5 epochs (5 steps) and at the end" in out
    recs = read_jsonl(res.metrics_path)
    assert [r["step"] for r in recs if r["split"] == "val"] == [5, 10, 12]
    lrs = [r["lr"] for r in recs if r["split"] == "train"]
    assert lrs[4] < lrs[5] == pytest.approx(max(lrs)) and lrs[-1] < lrs[6]  # the peak at the 6th step, then down
    epochs = [r for r in recs if r["split"] == "epoch"]
    assert len(epochs) == 12 and all(r["steps"] == 1 and r["images"] >= 1 for r in epochs)
    assert all(r["passes"] == pytest.approx(r["images"] / 8) for r in epochs)
    assert sum(r["images"] for r in epochs) == sum(r["images"] for r in recs if r["split"] == "train")
    first = next(line for line in out.splitlines() if line.startswith("epoch 0: "))
    assert first.startswith(f"epoch 0: 1 step, {epochs[0]['images']} images (") and "over the 8 training images" in first


@pytest.mark.parametrize("workers", [0, 2])
def test_the_own_data_command_sees_every_photo_in_every_epoch(tmp_path, workers):
    """docs/own-data.md's training command on its 120-photo folder at 224 px (the page's size), one
    worker or two: every epoch is one whole pass, spread evenly over its steps, nothing carried over."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_own_data import photos
    photos(tmp_path)
    trainer = cli.make_trainer(["--data", str(tmp_path / "photos" / "train"), "--num-classes", "3", "--recipe",
                                "full", "--epochs", "30", "--warmup-epochs", "3", "--workers", str(workers),
                                "--no-eval", "--quiet", "--output", str(tmp_path / "out")])
    loader, keys = trainer.loader, set(trainer.loader.source.keys)
    assert len(keys) == 120 and trainer.steps_per_epoch == len(loader) >= 3
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = [list(batch.keys) for batch, _ in loader]
        seen = [k for b in batches for k in b]
        assert len(batches) == trainer.steps_per_epoch and sorted(seen) == sorted(keys)  # each photo once
        assert max(map(len, batches)) - min(map(len, batches)) <= 3, [len(b) for b in batches]  # spread evenly
        assert loader.stats.carried_over[epoch] == 0
    assert trainer.images_per_step == pytest.approx(120 / trainer.steps_per_epoch)  # the lr's batch size
    loader.close()
