"""Runtime errors of a training run end in one line naming the file (a `SetupError`, which the command
line prints as ``train.py: error: ...`` with status 2): a full disk while saving a checkpoint, a
``--resume`` of another model's checkpoint, a checkpoint that is a malicious pickle."""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from apt_train import SetupError, TrainConfig, Trainer  # noqa: E402
from apt_train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint  # noqa: E402
from test_train import subset_index  # noqa: E402


def config(tmp_path: Path, out: Path, **kw) -> TrainConfig:
    flat = dict(data=subset_index(tmp_path, "train", 20), val_data=None, recipe="sample", max_tokens=1024,
                workers=0, quiet=True, output=out, seed=1)
    return TrainConfig.from_flat({**flat, **kw})


def test_a_full_disk_while_saving_names_the_file_and_keeps_the_earlier_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "o"
    trainer = Trainer(config(tmp_path, out, steps=4, save_every=2))
    real_save = torch.save

    def full_after_half(obj, f, *a, **kw):  # the disk fills up in the middle of the second checkpoint
        if trainer.global_step < 4:
            return real_save(obj, f, *a, **kw)
        f.write(b"PK\x03\x04" + b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_after_half)
    with pytest.raises(SetupError) as e:
        trainer.fit()
    msg = str(e.value)
    assert isinstance(e.value, CheckpointError) and "\n" not in msg
    assert msg.startswith(f"checkpoint {out / 'checkpoint-0000004.pt'} not written: No space left on device"), msg
    assert [p.name for p in out.iterdir() if p.suffix in (".pt", ".tmp")] == ["checkpoint-0000002.pt"]
    assert load_checkpoint(out)["global_step"] == 2  # the earlier one is intact


def test_resume_with_another_models_checkpoint_is_one_line(tmp_path):
    out = tmp_path / "small"
    Trainer(config(tmp_path, out, steps=1, num_classes=12)).fit()  # another head: 12 classes, not 10
    (ckpt,) = list_checkpoints(out)
    with pytest.raises(SetupError) as e:
        Trainer(config(tmp_path, tmp_path / "o", steps=2, resume=str(out)))
    msg = str(e.value)
    assert msg.startswith(f"--resume {ckpt}: a checkpoint of another model: ") and "\n" not in msg, msg
    assert "size mismatch for head.weight" in msg and "--initial-checkpoint" in msg


def test_a_malicious_pickle_is_not_a_plain_weights_file(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    bad = tmp_path / "checkpoint-0000001.pt"
    torch.save({"model": {}, "x": Payload()}, bad)
    for flat in (dict(resume=str(bad)), dict(checkpoint=str(bad))):
        with pytest.raises(SetupError) as e:
            Trainer(config(tmp_path, tmp_path / "o", steps=1, **flat))
        msg = str(e.value)
        assert msg.startswith(f"checkpoint {bad} is not a plain weights file") and "system" in msg, msg
        assert "weights_only" not in msg and "corrupt" not in msg and "\n" not in msg
    assert not (tmp_path / "pwned").exists()
