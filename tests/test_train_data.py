"""Where the trainer finds its data: the val split beside training data at a URL (as beside a local
folder). A folder of split folders passed where a folder of classes belongs: test_train_cli."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

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
