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
from apt_train.checkpoint import list_checkpoints, load_checkpoint, read_jsonl  # noqa: E402
from apt_train.trainer import run  # noqa: E402

STEP_FIELDS = {"step", "epoch", "loss", "lr", "images", "tokens", "tokens_per_image", "images_per_s", "tokens_per_s"}


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
    assert "step 12/12" in proc.stdout and "skipped bad samples: none" in proc.stdout
    assert list_checkpoints(tmp_path)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    """Steps 4-6 of a run resumed from its step-3 checkpoint equal the uninterrupted run's: same data,
    lr and losses (augmentation, drop path and a worker process on; the run crosses an epoch end)."""
    train, val = subset_index(tmp_path, "train", 20), subset_index(tmp_path, "val", 20)
    common = ["--data", train, "--val-data", val, "--recipe", "sample", "--max-tokens", "1024", "--steps", "6",
              "--save-every", "3", "--keep-checkpoints", "0", "--workers", "1", "--quiet", "--seed", "3"]
    a = tmp_path / "a"
    res_a = run(common + ["--output", str(a)])
    assert res_a.global_step == 6 and res_a.epoch == 1  # 20 images / 5 per batch: 4 steps per epoch
    ckpts = list_checkpoints(a)
    assert [p.name for p in ckpts] == ["checkpoint-0000003.pt", "checkpoint-0000006.pt"]
    recs_a = read_jsonl(a / "metrics.jsonl")

    # metrics: valid JSONL, every field, train records per step and eval records at the epoch end and the end
    train_a = [r for r in recs_a if r["split"] == "train"]
    assert [r["step"] for r in train_a] == [1, 2, 3, 4, 5, 6]
    for r in train_a:
        assert STEP_FIELDS <= set(r), set(r)
        assert r["images"] > 0 and r["tokens"] > 0 and r["images_per_s"] > 0 and r["tokens_per_s"] > 0
        assert r["tokens_per_image"] == pytest.approx(r["tokens"] / r["images"]) and r["tokens_per_image"] <= 196
        assert math.isfinite(r["loss"]) and r["lr"] > 0
    assert [r["epoch"] for r in train_a] == [0, 0, 0, 0, 1, 1]
    evals = [r for r in recs_a if r["split"] == "val"]
    assert [r["step"] for r in evals] == [4, 6] and all(r["images"] == 20 and 0 <= r["top1"] <= 1 for r in evals)
    assert sum(r["images"] for r in train_a[:4]) == 20  # one whole epoch, every image once

    # the checkpoint: exact position, loadable with weights_only, and by apt_model.from_timm
    state = load_checkpoint(ckpts[0])
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (3, 0, 3)
    from apt_model import from_timm

    m = from_timm("vit_tiny_patch16_224", num_classes=10, checkpoint_path=str(ckpts[-1]))
    for k, v in res_a.model.state_dict().items():
        assert torch.equal(v, m.state_dict()[k]), k

    # resume into a copy of the folder: the metrics past step 3 are dropped, then steps 4-6 rewritten
    b = tmp_path / "b"
    shutil.copytree(a, b)
    res_b = run(common + ["--output", str(b), "--resume", str(b / "checkpoint-0000003.pt")])
    assert res_b.global_step == 6
    recs_b = read_jsonl(b / "metrics.jsonl")
    assert [(r["split"], r["step"]) for r in recs_b] == [(r["split"], r["step"]) for r in recs_a]
    for ra, rb in zip(recs_a, recs_b):
        assert ra["epoch"] == rb["epoch"]
        if ra["split"] == "train":
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
    assert [r["step"] for r in recs] == [1, 2]
    json.dumps(recs)


def test_bad_samples_are_skipped_counted_and_reported(tmp_path, capsys):
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
    res = run(["--data", str(tmp_path / "bad.parquet"), "--no-eval", "--recipe", "short", "--max-tokens", "4096",
               "--workers", "0", "--quiet", "--output", str(tmp_path / "o")])
    assert sum(res.skipped["train"].values()) == 1
    out = capsys.readouterr().out
    assert "skipped bad samples: train 1 (ShardDataError: 1)" in out, out
    recs = read_jsonl(tmp_path / "o" / "metrics.jsonl")
    assert sum(r["images"] for r in recs) == rows.num_rows - 1
