"""A damaged .cls or .json member (issue 24.6, docs/reliability.md): what the loader does depends on
which members it reads. With the stored score maps (an eval transform matching the index) it reads
every member: skipped as ``checksum_mismatch`` (or, for an index without checksums, a .cls that is not
the label as ``bad_label``, a .json unnoticed: it is not parsed); otherwise it reads the image alone,
and the label from the index: no effect."""
from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from apt_data import APTConfig
from apt_data.loader import APTLoader
from apt_data.shards.index import read_index
from apt_data.sources.index import IndexSource

SHARDS = Path(__file__).resolve().parents[1] / "shards"


def damaged_copy(root: Path, member: str, checksums: bool) -> str:
    """``shards/val`` copied to ``root`` with sample 0's ``member`` overwritten in place (same size, so
    the tar headers still match the index); ``checksums=False`` drops the index's CRC32C columns."""
    root.mkdir()
    shutil.copy(SHARDS / "val-000000.tar", root)
    table = pq.read_table(SHARDS / "val.parquet")
    row = table.slice(0, 1).to_pylist()[0]
    off, size = row[f"{member}_offset"], row[f"{member}_size"]
    tar = root / row["shard"]
    data = bytearray(tar.read_bytes())
    data[off:off + size] = b"x" * size if member == "cls" else b"{" + b" " * (size - 1)
    tar.write_bytes(bytes(data))
    if not checksums:
        table = table.drop([c for c in table.column_names if c.endswith("_crc32c")])
    pq.write_table(table, root / "val.parquet")
    return row["key"]


@pytest.mark.parametrize("member, checksums, with_scores", [
    ("cls", True, "checksum_mismatch"), ("json", True, "checksum_mismatch"),
    ("cls", False, "bad_label"), ("json", False, None)])
def test_damaged_metadata_member(tmp_path, member, checksums, with_scores):
    key = damaged_copy(tmp_path / "s", member, checksums)
    index = read_index(tmp_path / "s" / "val.parquet")
    for packing in ("plan", "stream"):  # the stored score maps are used: every member is read
        loader = APTLoader(IndexSource(index), APTConfig(), max_tokens=4096, num_workers=0, train=False,
                           packing=packing)
        assert loader._scores
        keys = [k for batch, _ in loader for k in batch.keys]
        if with_scores is None:
            assert key in keys and not loader.stats.skipped
        else:
            assert key not in keys and len(keys) == 99
            assert loader.stats.skipped == {with_scores: 1} and loader.stats.skipped_keys == [key]
    # another image size: the stored score maps do not apply, the image member alone is read
    loader = APTLoader(IndexSource(index), APTConfig(), max_tokens=4096, num_workers=0, train=False, image_size=160)
    assert not loader._scores
    keys = [k for batch, _ in loader for k in batch.keys]
    assert key in keys and len(keys) == 100 and not loader.stats.skipped
