"""Index plain webdataset shards in place: a Parquet index for tars someone else wrote, images untouched.

Each tar is scanned once; every image is decoded through the eval transform at ``image_size`` and
gets one row (member offsets, sizes, CRC32Cs, label, sizes, token counts), so `APTLoader` plans
exact batches and reads each sample from the original tar. Command line: ``tools/index_shards.py``;
see docs/shards.md.
"""
from __future__ import annotations

import functools
import io
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from ..config import APTConfig
from .build import pool_map
from .errors import ShardStats, report_bad
from .format import (EXTRA_MEMBERS, IMAGE_EXTS, INPLACE_FORMAT, MASK_MEMBER, MEMBERS, member_checksum, member_column)
from .index import index_row, index_table, write_index
from .reader import TarCorrupt, TarTruncated, scan_samples
from .urls import expand_urls

PathLike = Union[str, os.PathLike]

__all__ = ["IndexResult", "index_webdataset", "scan_webdataset_shard"]


@dataclass
class IndexResult:
    """What `index_webdataset` wrote: ``index_path``, ``num_samples``, ``num_shards``, ``stats``."""

    index_path: Path
    num_samples: int
    num_shards: int
    stats: ShardStats = field(default_factory=ShardStats)

    def summary(self) -> str:
        return (f"{self.num_samples} samples in {self.num_shards} shards indexed in place; {self.stats.summary()}; "
                f"index {self.index_path}")


def _label(members: dict, label_field: Optional[str]) -> int:
    """The label from ``.cls``, else from the JSON member's ``label_field``; ValueError if neither."""
    if "cls" in members and label_field is None:
        return int(members["cls"][1].decode("ascii").strip())
    if label_field is not None:
        if "json" not in members:
            raise ValueError(f"no .json member with the label field {label_field!r}")
        value = json.loads(members["json"][1])
        for part in label_field.split("."):
            value = value[part]
        return int(value)
    raise ValueError(f"no .cls member (members: {sorted(members)}); name a JSON label field")


def scan_webdataset_shard(job: tuple) -> tuple[list[dict], ShardStats]:
    """One shard (run in a worker): ``(index rows, stats of the samples left out)``."""
    path, rel, cfg, image_size, crop, multiple, label_field, strict = job
    from PIL import Image

    from ..layout import patchify
    from ..transforms import ImageTransform

    transform = ImageTransform(size=image_size, keep_aspect=not crop, multiple=multiple)
    rows: list[dict] = []
    stats = ShardStats()
    bad = functools.partial(report_bad, path, strict=strict, stats=stats)  # bad(key, reason, detail)

    def finish(key: str, members: dict) -> None:
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if ext is None:
            return bad(key, "missing_image", f"members: {sorted(members)}")
        data = members[ext][1]
        try:
            label = _label(members, label_field)
            if label < 0:
                raise ValueError(f"negative label {label}")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            return bad(key, "bad_label", str(e)[:200])
        try:
            with Image.open(io.BytesIO(data)) as im:
                ow, oh = im.size
            img = transform(data, name=f"{path}:{key}")
        except (ValueError, OSError) as e:
            return bad(key, "corrupt_image", str(e)[:200])
        problem = _mask_problem(members, (ow, oh))
        if problem is not None:
            return bad(key, "bad_mask", problem)
        meta = {"label": label, "source": f"{key}.{ext}", "orig_width": ow, "orig_height": oh,
                "width": img.shape[1], "height": img.shape[0], "tokens": patchify(img, cfg).counts()}
        spans = {"jpg": members[ext], **{m: members[m] for m in MEMBERS + EXTRA_MEMBERS if m != "jpg" and m in members}}
        if label_field is not None:
            spans.pop("cls", None)  # the label is the index's; a .cls of another meaning is not checked
        row = index_row(key, rel, meta, {m: (o, len(d)) for m, (o, d) in spans.items()},
                        {m: member_checksum(d) for m, (_, d) in spans.items()})
        row["image_ext"] = ext
        rows.append(row)

    try:
        with open(path, "rb") as f:
            for key, members in scan_samples(f):
                finish(key, members)
    except (TarCorrupt, TarTruncated, OSError) as e:
        bad(getattr(e, "key", None), "corrupt_tar", f"{type(e).__name__}: {e}; the rest of the shard is skipped")
    return rows, stats


def _mask_problem(members: dict, size: tuple[int, int]) -> Optional[str]:
    """What is wrong with a sample's ``.seg.png`` mask member (not a PNG PIL reads, or not ``size``
    (W, H), its image's), or None (also when it has none)."""
    if MASK_MEMBER not in members:
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(members[MASK_MEMBER][1])) as im:
            got, mode = im.size, im.mode
    except Exception as e:
        return f".{MASK_MEMBER}: not a readable image ({type(e).__name__}: {e})"[:200]
    if mode not in ("L", "P", "1", "I", "I;16"):
        return f".{MASK_MEMBER}: a mode {mode} image, not one class id per pixel"
    if tuple(got) != tuple(size):
        return f".{MASK_MEMBER} is {got[0]}x{got[1]}, its image {size[0]}x{size[1]}"
    return None


def index_webdataset(tars: Union[PathLike, Sequence[PathLike]], index_path: PathLike, *,
                     cfg: Optional[APTConfig] = None, image_size: int = 224, crop: bool = True,
                     multiple: Optional[int] = None, label_field: Optional[str] = None,
                     workers: Optional[int] = None, strict: bool = False, progress: bool = False) -> IndexResult:
    """Write ``index_path`` for the webdataset shards ``tars`` (paths or a brace pattern); bad samples
    are logged, counted and left out (``strict``: `ShardDataError`)."""
    cfg = cfg or APTConfig()
    multiple = multiple or cfg.patch_size
    index_path = Path(index_path)
    paths = [Path(p) for p in expand_urls(tars)]
    if not paths:
        raise ValueError(f"{tars}: no shards")
    root = index_path.parent.resolve()
    jobs = [(str(p), os.path.relpath(p.resolve(), root), cfg, image_size, crop, multiple, label_field, strict)
            for p in paths]
    from tqdm import tqdm

    results = list(tqdm(pool_map(scan_webdataset_shard, jobs, workers), total=len(jobs), unit="shard",
                        desc="index_shards", file=sys.stderr, disable=not (progress and sys.stderr.isatty())))
    rows = [row for r, _ in results for row in r]
    stats = ShardStats(skipped=sum((s.skipped for _, s in results), Counter()),
                       events=[e for _, s in results for e in s.events])
    if not rows:
        raise ValueError(f"{tars}: no readable samples ({stats.summary()})")
    keys = [r["key"] for r in rows]
    if len(set(keys)) != len(keys):
        dup = sorted(k for k, n in Counter(keys).items() if n > 1)[:5]
        raise ValueError(f"sample keys repeat across the shards (e.g. {dup}); the index needs unique keys")
    stats.samples = len(rows)
    import pyarrow as pa

    table = index_table(rows, cfg.num_scales)
    table = table.append_column("image_ext", pa.array([r["image_ext"] for r in rows], pa.string()))
    labels = sorted({r["label"] for r in rows})
    settings = {"image_size": image_size, "crop": crop, "multiple": multiple, "jpeg_quality": None,
                "prefix": index_path.stem, "shards": [j[1] for j in jobs], "num_samples": len(rows),
                "classes": [{"label": int(v), "class": str(v), "name": "", "imagenet_index": None} for v in labels],
                "seed": None, "shuffle": False, "format": INPLACE_FORMAT, "label_field": label_field}
    if f"{member_column(MASK_MEMBER)}_offset" in table.column_names:
        settings["masks"] = {"member": MASK_MEMBER, "labels": {"reduce_zero_label": False, "void": []}}
    write_index(index_path, table, cfg, settings)
    return IndexResult(index_path, len(rows), len(jobs), stats)

