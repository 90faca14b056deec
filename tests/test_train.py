"""The trainer on the sample shards: loss falls on a repeated batch, exact resume, checkpoints, metrics."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from apt_data import read_index  # noqa: E402
from apt_data.shards import write_index  # noqa: E402
from apt_train.checkpoint import list_checkpoints, load_checkpoint  # noqa: E402
from apt_train.metrics import read_jsonl  # noqa: E402
from apt_train import DataSettings, OptimSettings, RunSettings, SetupError, TrainConfig, Trainer  # noqa: E402
from apt_train.recipes import apply_recipe  # noqa: E402
from apt_train.cli import run  # noqa: E402

STEP_FIELDS = {"step", "epoch", "loss", "lr", "images", "tokens", "tokens_per_image", "images_per_s", "tokens_per_s",
               "fill"}


def subset_index(out: Path, split: str = "train", n: int = 20) -> str:
    """A Parquet index over the first ``n`` samples of a split of the sample shards (absolute shard paths)."""
    index = read_index(ROOT / "shards", split)
    table = index.table.slice(0, n)
    absolute = pa.array([str((index.root / s).resolve()) for s in table.column("shard").to_pylist()])
    table = table.set_column(table.column_names.index("shard"), "shard", absolute)
    path = out / f"{split}{n}.parquet"
    write_index(path, table, index.config, {k: v for k, v in index.settings.items() if k != "shards"})
    return str(path)


def test_loss_falls_when_overfitting_one_batch(tmp_path):
    """tools/train.py as a script: a repeated batch of real images is learnt (loss falls several-fold)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools/train.py"), "--overfit-batches", "1", "--steps", "12", "--max-tokens", "1024",
         "--recipe", "short", "--lr", "1e-3", "--min-lr", "1e-3", "--layer-decay", "1.0", "--drop-path", "0", "--label-smoothing", "0",
         "--no-eval", "--workers", "0", "--output", str(tmp_path), "--log-every", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    recs = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in recs] == list(range(1, 13))
    assert len({r["images"] for r in recs}) == 1  # the same batch every step
    losses = [r["loss"] for r in recs]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.4 * losses[0] and losses[-1] < min(losses[:6]), losses
    assert "step 12/12" in proc.stderr and "skipped bad samples: none" in proc.stderr
    assert list_checkpoints(tmp_path)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    """Steps 5-7 of a run resumed from its mid-epoch step-4 checkpoint equal the uninterrupted run's: same
    batches, lr and losses (streamed packing with augmentation, drop path and a worker process on; the
    run crosses two epoch ends, each carrying samples over)."""
    train, val = subset_index(tmp_path, "train", 40), subset_index(tmp_path, "val", 20)
    common = ["--data", train, "--val-data", val, "--recipe", "sample", "--max-tokens", "1024", "--steps", "7",
              "--save-every", "2", "--keep-checkpoints", "0", "--workers", "1", "--quiet", "--seed", "3"]
    a = tmp_path / "a"
    res_a = run(common + ["--output", str(a)])
    assert res_a.global_step == 7 and res_a.epoch == 2  # 40 images, ~7.5 per batch: 3 streamed steps per epoch
    ckpts = list_checkpoints(a)
    assert [p.name for p in ckpts] == ["checkpoint-0000002.pt", "checkpoint-0000004.pt", "checkpoint-0000006.pt",
                                       "checkpoint-0000007.pt"]
    recs_a = read_jsonl(a / "metrics.jsonl")

    # metrics: valid JSONL, every field, train records per step and eval records at the epoch end and the end
    train_a = [r for r in recs_a if r["split"] == "train"]
    assert [r["step"] for r in train_a] == [1, 2, 3, 4, 5, 6, 7]
    for r in train_a:
        assert STEP_FIELDS <= set(r), set(r)
        assert r["images"] > 0 and r["tokens"] > 0 and r["images_per_s"] > 0 and r["tokens_per_s"] > 0
        assert r["tokens_per_image"] == pytest.approx(r["tokens"] / r["images"]) and r["tokens_per_image"] <= 196
        assert math.isfinite(r["loss"]) and r["lr"] > 0 and 0.9 < r["fill"] <= 1
    assert [r["epoch"] for r in train_a] == [0, 0, 0, 1, 1, 1, 2]
    evals = [r for r in recs_a if r["split"] == "val"]
    # 3 steps per epoch: epoch-end evaluations every 2 epochs (at least 5 steps apart), and at the end
    assert [r["step"] for r in evals] == [6, 7] and all(r["images"] == 20 and 0 <= r["top1"] <= 1 for r in evals)
    epochs = [r for r in recs_a if r["split"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1] and all(r["fill"] > 0.9 and r["carried_over"] > 0 for r in epochs)

    # the checkpoint: exact position (mid-epoch, with the loader's state), loadable with weights_only,
    # and by apt_model.from_timm
    state = load_checkpoint(ckpts[1])
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (4, 1, 1)
    assert state["loader"][0]["packing"] == "stream" and state["loader"][0]["step"] == 1
    from apt_model import from_timm

    m = from_timm("vit_tiny_patch16_224", num_classes=10, checkpoint_path=str(ckpts[-1]))
    for k, v in res_a.model.state_dict().items():
        assert torch.equal(v, m.state_dict()[k]), k

    # resume into a copy of the folder: the metrics past step 4 are dropped, then steps 5-7 rewritten
    b = tmp_path / "b"
    shutil.copytree(a, b)
    res_b = run(common + ["--output", str(b), "--resume", str(b / "checkpoint-0000004.pt")])
    assert res_b.global_step == 7
    recs_b = read_jsonl(b / "metrics.jsonl")
    assert [(r["split"], r["step"]) for r in recs_b] == [(r["split"], r["step"]) for r in recs_a]
    for ra, rb in zip(recs_a, recs_b):
        assert ra["epoch"] == rb["epoch"]
        if ra["split"] == "epoch":  # the whole epoch, though the resumed run did only part of it
            assert (ra["carried_over"], ra["steps"], ra["images"]) == (rb["carried_over"], rb["steps"], rb["images"])
            assert ra["fill"] == pytest.approx(rb["fill"]) and ra["passes"] == pytest.approx(rb["passes"])
        elif ra["split"] == "train":
            assert (ra["images"], ra["tokens"], ra["lr"]) == (rb["images"], rb["tokens"], rb["lr"])
            assert abs(ra["loss"] - rb["loss"]) <= 1e-6, (ra, rb)
        else:
            assert ra["top1"] == rb["top1"] and abs(ra["loss"] - rb["loss"]) <= 1e-6
    for k, v in res_a.model.state_dict().items():
        assert torch.allclose(v, res_b.model.state_dict()[k], atol=1e-6), k


def test_resume_from_a_folder_takes_its_newest_checkpoint(tmp_path):
    train = subset_index(tmp_path, "train", 10)
    common = ["--data", train, "--no-eval", "--recipe", "short", "--max-tokens", "1024", "--workers", "0", "--quiet",
              "--output", str(tmp_path / "o")]
    run(common + ["--steps", "1"])
    res = run(common + ["--steps", "2", "--resume", str(tmp_path / "o")])
    assert res.global_step == 2
    recs = read_jsonl(tmp_path / "o" / "metrics.jsonl")
    assert [r["step"] for r in recs if r["split"] == "train"] == [1, 2]
    json.dumps(recs)


def test_bad_samples_are_skipped_counted_and_reported(tmp_path, caplog):
    """A corrupt JPEG in a shard: the run goes on, and the end of the run reports the skip."""
    index = read_index(ROOT / "shards", "train")
    rows = index.table.slice(0, 12)
    shard = tmp_path / "train-000000.tar"
    data = bytearray((index.root / rows.column("shard")[0].as_py()).read_bytes())
    bad = [r for r in rows.to_pylist() if r["shard"] == "train-000000.tar"][3]
    off, size = bad["jpg_offset"], bad["jpg_size"]
    data[off:off + size] = b"\0" * size  # the JPEG member of one sample is zeroed
    shard.write_bytes(bytes(data))
    rows = rows.filter(pa.compute.equal(rows.column("shard"), "train-000000.tar"))
    rows = rows.set_column(rows.column_names.index("shard"), "shard", pa.array([str(shard)] * rows.num_rows))
    write_index(tmp_path / "bad.parquet", rows, index.config, {k: v for k, v in index.settings.items() if k != "shards"})
    with caplog.at_level("INFO", logger="apt_train"):
        res = run(["--data", str(tmp_path / "bad.parquet"), "--no-eval", "--recipe", "short", "--max-tokens", "4096",
                   "--workers", "0", "--quiet", "--output", str(tmp_path / "o")])
    assert sum(res.skipped["train"].values()) == 1
    out = "\n".join(caplog.messages)
    assert "skipped bad samples: train 1 (checksum_mismatch: 1)" in out, out  # the reader's structured reason
    recs = read_jsonl(tmp_path / "o" / "metrics.jsonl")
    assert sum(r["images"] for r in recs if r["split"] == "train") == rows.num_rows - 1


def test_trainer_runs_from_a_python_config(tmp_path):
    """No argparse: a frozen TrainConfig in sections, the recipe filling what was left unset, two steps
    and an evaluation on the sample shards, and the config stored in the checkpoint as a flat dict."""
    config = TrainConfig(data=DataSettings(train=ROOT / "shards", val=subset_index(tmp_path, "val", 10),
                                           max_tokens=1024, workers=0),
                         optim=OptimSettings(recipe="short", lr=1e-4, steps=2),
                         run=RunSettings(quiet=True, output=tmp_path / "o"))
    assert config.data.train == str(ROOT / "shards") and config.run.output == str(tmp_path / "o")
    assert config.optim.layer_decay == 0.99 and config.optim.lr == 1e-4 and config.optim.epochs == 1  # the recipe's
    assert config.max_tokens == 1024 == config.data.max_tokens  # flat names read through to their section
    assert config == TrainConfig.from_flat(dict(data=ROOT / "shards", val_data=subset_index(tmp_path, "val", 10),
                                                max_tokens=1024, workers=0, recipe="short", lr=1e-4, steps=2,
                                                quiet=True, output=tmp_path / "o"))
    with pytest.raises(AttributeError):  # frozen
        config.optim = OptimSettings()
    trainer = Trainer(config)
    assert trainer.config is config  # taken as given
    res = trainer.fit()
    assert res.global_step == 2 and res.final_eval is not None and res.final_eval.images == 10
    recs = read_jsonl(tmp_path / "o" / "metrics.jsonl")
    assert [(r["split"], r["step"]) for r in recs] == [("train", 1), ("train", 2), ("val", 2)]
    assert all(r["lr"] == pytest.approx(1e-4 * (1 + math.cos(math.pi * (r["step"] - 1) / 2)) / 2)
               for r in recs if r["split"] == "train")  # cosine from the absolute lr to 0, no warmup
    state = load_checkpoint(res.checkpoint)
    assert isinstance(state["config"], dict) and state["config"]["data"] == str(ROOT / "shards")
    assert TrainConfig.from_dict(state["config"]) == trainer.config
    json.dumps(state["config"])


def test_recipes_fill_only_unset_fields():
    short = TrainConfig.from_flat(dict(data="d", recipe="short"))
    assert (short.optim.lr, short.optim.blr, short.optim.epochs, short.data.augment) == (1e-6, None, 1, False)
    assert TrainConfig.from_dict(short.to_dict()) == short  # idempotent
    flat = dict(recipe="short", lr=None, epochs=None)
    assert apply_recipe(flat)["lr"] == 1e-6 and flat["lr"] is None  # the input is not changed
    blr = TrainConfig.from_flat(dict(data="d", recipe="short", blr=1e-3))  # an explicit blr beats the recipe's lr
    assert (blr.optim.lr, blr.optim.blr) == (None, 1e-3) and TrainConfig.from_dict(blr.to_dict()) == blr
    mine = TrainConfig.from_flat(dict(data="d", recipe="full", epochs=2, lr=3e-4, auto_augment="none"))
    assert (mine.optim.epochs, mine.optim.lr, mine.data.auto_augment, mine.optim.layer_decay) == (2, 3e-4, "none", 0.75)
    with pytest.raises(SetupError, match="recipe"):
        TrainConfig.from_flat(dict(data="d", recipe="nope"))


def test_config_is_validated_once_when_it_is_made():
    """Bad values fail in the constructor, naming the flag; unknown flat names too. The APTConfig is
    built there, once, and the trainer reuses it for a model of that patch size."""
    with pytest.raises(SetupError, match="no training data"):
        TrainConfig()
    for flat, message in [(dict(steps=0), "--steps must be positive, got 0"),
                          (dict(max_tokens=0), "--max-tokens: max_tokens must be a positive int"),
                          (dict(thresholds=(5.5,)), "one value per scale"),
                          (dict(workers=-1), "--workers must be >= 0"),
                          (dict(mixup=-1.0), "--mixup/--cutmix"),
                          (dict(max_tokenz=5), "unknown training settings: max_tokenz")]:
        with pytest.raises(SetupError, match=message):
            TrainConfig.from_flat(dict(data="d", **flat))
    config = TrainConfig.from_flat(dict(data="d", no_eval=True))
    assert config.data.val is None and config.batching.patch_size == 16
    assert TrainConfig.from_dict({**config.to_dict(), "a_setting_of_an_older_version": 1}) == config
    assert config.batching_for(16) is config.batching and config.batching_for(14).patch_size == 14
