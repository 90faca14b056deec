"""Integrity checks: CRC32C of every shard member in the index, verified on every indexed read;
checksums of every checkpoint tensor, verified on load; unreadable checkpoints as one clear error."""
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from apt_data.image import decode_image
from apt_data.shards import CHECKSUM, MEMBERS, ShardDataError, ShardStats, iter_shard, read_index, read_sample, write_index
from apt_data.shards.format import member_checksum
from apt_data.sources.index import open_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def shard_copy(tmp_path):
    dst = tmp_path / "shards"
    shutil.copytree(ROOT / "shards", dst, ignore=shutil.ignore_patterns("README.md"))
    return dst


def _flip(path: Path, pos: int, mask: int) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([b ^ mask]))


def test_the_embedded_index_has_the_checksum_of_every_member():
    index = read_index(ROOT / "shards")
    assert all(f"{m}_{CHECKSUM}" in index.table.column_names for m in MEMBERS)
    rows = {r["key"]: r for r in index.table.to_pylist()}
    rec = next(iter_shard(ROOT / "shards" / "train-000000.tar"))
    row = rows[rec.key]
    with open(ROOT / "shards" / row["shard"], "rb") as f:
        for m in MEMBERS:
            f.seek(row[f"{m}_offset"])
            assert member_checksum(f.read(row[f"{m}_size"])) == row[f"{m}_{CHECKSUM}"]


def test_every_single_bit_flip_in_a_member_is_detected(shard_copy):
    src = open_shards(str(shard_copy))
    rng = random.Random(0)
    rows = [src.row(i) for i in range(len(src))]
    first = [i for i, r in enumerate(rows) if r["shard"] == "train-000000.tar"][:5]
    shard = shard_copy / "train-000000.tar"
    flips = 0
    for i in first:
        src.read_record(i)  # intact: reads
        for m in MEMBERS:
            off, size = rows[i][f"{m}_offset"], rows[i][f"{m}_size"]
            for _ in range(60 if m == "jpg" else 12):
                pos, mask = off + rng.randrange(size), 1 << rng.randrange(8)
                _flip(shard, pos, mask)
                try:
                    for read in (src.read_record, src.read_scores):
                        with pytest.raises(ShardDataError, match="checksum mismatch") as e:
                            read(i)
                        assert e.value.key == src.keys[i] and e.value.reason == "checksum_mismatch"
                        assert str(shard) in str(e.value) and f".{m} member" in str(e.value)
                    if m == "jpg":  # the jpeg-only read verifies the one member it reads
                        with pytest.raises(ShardDataError, match="checksum mismatch"):
                            src.read(i)
                    with pytest.raises(ValueError, match=src.keys[i]):
                        read_sample(rows[i], shard_copy, strict=True)
                    flips += 1
                finally:
                    _flip(shard, pos, mask)
        src.read_record(i)
    assert flips >= 200


def test_a_flip_in_a_jpeg_that_still_decodes_is_detected(shard_copy):
    src = open_shards(str(shard_copy))
    row = src.row(0)
    shard = shard_copy / row["shard"]
    jpeg = src.read(0)
    decoded = 0
    for k in range(len(jpeg) // 2, len(jpeg) - 8, 97):  # entropy-coded data: a flip usually still decodes
        bad = bytearray(jpeg)
        bad[k] ^= 0x10
        try:
            decode_image(bytes(bad))
        except ValueError:
            continue
        _flip(shard, row["jpg_offset"] + k, 0x10)
        try:
            with pytest.raises(ShardDataError, match="checksum mismatch in the .jpg member") as e:
                src.read_record(0)
            assert e.value.key == src.keys[0]
            stats = ShardStats()  # not strict: counted as a bad sample, skipped
            assert read_sample(row, shard_copy, stats=stats) is None
            assert stats.skipped["checksum_mismatch"] == 1
        finally:
            _flip(shard, row["jpg_offset"] + k, 0x10)
        decoded += 1
        if decoded == 5:
            break
    assert decoded == 5


def test_an_index_without_checksum_columns_still_reads_and_says_once_it_is_not_verified(shard_copy, caplog):
    index = read_index(shard_copy)
    old = index.table.drop([f"{m}_{CHECKSUM}" for m in MEMBERS])
    write_index(shard_copy / "old.parquet", old, index.config,
                {k: v for k, v in index.settings.items() if k != "shards"})
    with caplog.at_level("WARNING", "apt_data.sources"):
        src = open_shards(str(shard_copy / "old.parquet"))
        open_shards(str(shard_copy / "old.parquet"))  # opened again (train and eval, a second loader): not again
        open_shards(str(shard_copy / "train.parquet"))  # an index with checksums: nothing to say
    said = [r.getMessage() for r in caplog.records if "without checksum verification" in r.getMessage()]
    assert len(said) == 1 and str(shard_copy) in said[0] and f"no {CHECKSUM} columns" in said[0]
    assert f"jpg_{CHECKSUM}" not in src.table.column_names
    for i in range(len(src)):
        src.read_record(i)
    row = src.row(0)
    assert read_sample(row, shard_copy, strict=True).key == row["key"]
    # not verified (no checksums), and no crash: a flip in the pixels reads as it is
    _flip(shard_copy / row["shard"], row["jpg_offset"] + row["jpg_size"] // 2, 0x01)
    assert src.read_record(0)[1].key == row["key"]


# ------------------------------------------------------------------------------------ checkpoints
torch = pytest.importorskip("torch")


def _small_checkpoint(path):
    from apt_train.checkpoint import save_checkpoint

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 10))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    save_checkpoint(path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 0})
    return model


def test_checkpoint_round_trip_and_flipped_tensor_bytes(tmp_path):
    from apt_train.checkpoint import CheckpointError, load_checkpoint

    path = tmp_path / "checkpoint-0000001.pt"
    model = _small_checkpoint(path)
    state = load_checkpoint(path)
    assert torch.equal(state["model"]["0.weight"], model.state_dict()["0.weight"])
    with zipfile.ZipFile(path) as z:  # where the bytes of the first layer's weight (64x64 floats) lie
        info = next(i for i in z.infolist() if i.file_size == 64 * 64 * 4)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        n, m = np.frombuffer(f.read(4), "<u2")
    start = info.header_offset + 30 + int(n) + int(m) + 1000
    for k in range(64):
        _flip(path, start + k, 0xFF)
    with pytest.raises(CheckpointError, match="checksum mismatch in tensor") as e:
        load_checkpoint(path)
    assert isinstance(e.value, ValueError) and str(path) in str(e.value) and "\n" not in str(e.value)
    assert "weight" in str(e.value)


@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "random"])
def test_unreadable_checkpoints_raise_one_clear_error(tmp_path, kind):
    from apt_train.checkpoint import CheckpointError, load_checkpoint

    path = tmp_path / "checkpoint-0000001.pt"
    _small_checkpoint(path)
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[:len(data) // 2], "text": b"hello, not a checkpoint\n",
                      "random": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))}[kind])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert isinstance(e.value, ValueError) and str(path) in str(e.value) and "\n" not in str(e.value)
    assert "cannot be read" in str(e.value)


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if "error" in line.lower()]


@pytest.mark.parametrize("kind", ["empty", "truncated", "text"])
def test_train_resume_and_checkpoint_bad_files_exit_2_with_one_line(tmp_path, kind):
    path = tmp_path / "bad.pt"
    _small_checkpoint(path)
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[:len(data) // 3], "text": b"not a checkpoint\n"}[kind])
    flag = "--resume" if kind != "text" else "--checkpoint"
    proc = subprocess.run([sys.executable, str(ROOT / "tools/train.py"), flag, str(path), "--workers", "0",
                           "--output", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("train.py: error: checkpoint ") and str(path) in lines[0], lines
    assert "cannot be read" in lines[0]


def test_evaluate_checkpoint_with_a_flipped_tensor_exits_2_with_one_line(tmp_path):
    path = tmp_path / "bad.pt"
    _small_checkpoint(path)
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.file_size == 64 * 64 * 4)
    _flip(path, info.header_offset + 30 + len(info.filename) + 200, 0x04)
    proc = subprocess.run([sys.executable, str(ROOT / "tools/evaluate.py"), "--checkpoint", str(path),
                           "--workers", "0", "--max-batches", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "checksum mismatch in tensor" in lines[0] and str(path) in lines[0], lines
