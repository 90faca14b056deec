"""Where the trainer finds its data: the val split beside training data at a URL (as beside a local
folder), and a folder of split folders (``train/``, ``val/``) passed where a folder of classes belongs."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from apt_train import cli  # noqa: E402
from apt_train.data import default_val_data  # noqa: E402
from http_server import RangeServer  # noqa: E402

FAST = ["--steps", "1", "--workers", "0", "--max-tokens", "2048", "--quiet"]


def test_data_at_a_url_finds_the_val_split_the_server_has(tmp_path, capsys):
    with RangeServer(ROOT / "shards") as srv:
        url = srv.url("").rstrip("/")
        trainer = cli.make_trainer(["--data", url, "--output", str(tmp_path / "o"), *FAST])
        assert trainer.config.data.val == f"{url}:val" and len(trainer.val_loader.source) == 100
        assert default_val_data(f"{url}/train.parquet") == (
            f"{url}/val.parquet", f"validation data: {url}/val.parquet (the val split beside --data; --val-data to "
                                  "change, --no-eval to skip)")
        assert default_val_data(f"{url}:val")[0] is None  # val itself: nothing beside it
    only_train = tmp_path / "only_train"
    only_train.mkdir()
    shutil.copy(ROOT / "shards" / "train.parquet", only_train)
    with RangeServer(only_train) as srv:  # no val.parquet on this server
        found, note = default_val_data(srv.url("").rstrip("/"))
        assert found is None and note.startswith("validation data: none")


def test_a_folder_of_split_folders_says_which_folder_to_pass(tmp_path, capsys):
    images = sorted((ROOT / "tests/data/images").glob("*.JPEG"))
    mydata = tmp_path / "mydata"
    for i, split in enumerate(["train", "val"]):
        for c, name in enumerate(["cat", "dog"]):
            d = mydata / split / name
            d.mkdir(parents=True)
            shutil.copy(images[4 * i + 2 * c], d / "a.jpg")
            shutil.copy(images[4 * i + 2 * c + 1], d / "b.jpg")
    with pytest.raises(SystemExit) as e:
        cli.make_trainer(["--data", str(mydata), "--output", str(tmp_path / "o"), *FAST])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"train.py: error: --data {mydata}: its folders train, val are splits, not classes: pass --data "
                   f"{mydata / 'train'} (its val split {mydata / 'val'} is found by itself)")
    trainer = cli.make_trainer(["--data", str(mydata / "train"), "--output", str(tmp_path / "o"), *FAST])
    assert trainer.config.data.val == str(mydata / "val") and trainer.model.num_classes == 2
