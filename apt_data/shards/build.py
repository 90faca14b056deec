"""Building a shard set from images: planning, one task per shard, sidecar resume, a lock on the output.

Each shard is written atomically, then its sidecar ``.tar.idx.json``; only a shard with a matching
sidecar counts as done, so a rerun redoes only what is missing, and the index is built from the
sidecars. ``tools/make_shards.py`` is its command line; see docs/shards.md.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

from ..config import APTConfig
from ..io import atomic_write_bytes
from ..listing import describe_left_out
from ..masks import MaskLabels
from .encode import SourceError, encode_sample, encode_sample_mask, sample_meta
from .errors import ShardDataError, ShardStats
from .format import FORMAT_VERSION
from .index import config_dict, index_row, index_table, write_index
from .plan import digest, load_class_table, make_key, plan_mask_samples, plan_samples
from .reader import iter_shard
from .writer import ShardWriter

log = logging.getLogger("apt_data.shards.build")

PathLike = Union[str, os.PathLike]
SIDECAR = ".idx.json"

__all__ = ["BuildResult", "SIDECAR", "ShardTask", "build_shard", "build_shards", "load_class_table", "make_key",
           "part_tasks", "plan_mask_samples", "plan_samples", "pool_map"]


@dataclass(frozen=True)
class ShardTask:
    """Everything a worker needs to write one shard (picklable, no open resources)."""

    index: int
    path: str
    fingerprint: str
    samples: tuple  # of (source path, source name, key, label, extra meta dict[, mask path])
    cfg: APTConfig
    settings: dict  # the index's: image_size, crop, multiple, jpeg_quality[, exif_transpose][, masks]
    strict: bool
    validate: bool


@dataclass
class BuildResult:
    """What a run did: totals, shards built vs. reused, skipped sources (``stats``)."""

    out: Path
    index_path: Optional[Path]  # None for one part of a split build
    num_samples: int
    num_shards: int
    built: int
    resumed: int
    stats: ShardStats = field(default_factory=ShardStats)
    seconds: float = 0.0
    left_out: Counter = field(default_factory=Counter)  # the source folder's non-image files, by extension

    def summary(self) -> str:
        """``N samples in S shards (B built, R already complete); kept ..., skipped ...[; 2 non-image
        files left out (.gif 2)]; index PATH`` (a part of a split build: ``...; no index: merge the parts``)."""
        where = f"index {self.index_path}" if self.index_path is not None else "no index: merge the parts (--merge)"
        dropped = f"; {describe_left_out(self.left_out)}" if self.left_out else ""
        return (f"{self.num_samples} samples in {self.num_shards} shards ({self.built} built, {self.resumed} "
                f"already complete); {self.stats.summary()}{dropped}; {where}")


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR)


def _load_done(task: ShardTask) -> Optional[dict]:
    """The sidecar of a complete shard for exactly this plan, else None."""
    path = Path(task.path)
    try:
        side = json.loads(_sidecar(path).read_text())
    except (OSError, ValueError):
        return None
    if side.get("fingerprint") != task.fingerprint or not path.exists() or path.stat().st_size != side.get("size"):
        return None
    return side


def build_shard(task: ShardTask) -> int:
    """Write one shard and then its sidecar; returns the task's index. Runs in a worker."""
    path, s = Path(task.path), task.settings
    mask_labels = MaskLabels(**s["masks"]["labels"]) if "masks" in s else None
    rows, skipped = [], []
    writer = ShardWriter(path)
    try:
        for src_path, name, key, label, extra, *mask_path in task.samples:
            try:
                enc = encode_sample(src_path, task.cfg, s["image_size"], crop=s["crop"], multiple=s["multiple"],
                                    quality=s["jpeg_quality"], name=name,
                                    exif_transpose=s.get("exif_transpose", False))
                mask = encode_sample_mask(mask_path[0], enc, mask_labels) if mask_path else None
            except SourceError as e:
                if task.strict:
                    raise ShardDataError(name, key, e.reason, e.detail) from None
                skipped.append({"source": name, "key": key, "reason": e.reason, "detail": e.detail[:300]})
                continue
            meta = sample_meta(key, enc, task.cfg, label=label, source=name, crop=s["crop"],
                               quality=s["jpeg_quality"], extra=extra)
            offsets = writer.write_sample(key, enc.jpeg, label, meta, enc.scores, mask)
            rows.append(index_row(key, path.name, meta, offsets, writer.checksums[key]))
        size = writer.commit()
    except BaseException:
        writer.abort()
        raise
    if task.validate:  # re-read what was written, decoding every JPEG, before declaring it done
        keys = [r.key for r in iter_shard(path, strict=True, validate=True)]
        if keys != [r["key"] for r in rows]:
            path.unlink()
            raise RuntimeError(f"{path}: re-read keys differ from the written ones")
    side = {"format_version": FORMAT_VERSION, "fingerprint": task.fingerprint, "shard": path.name,
            "size": size, "rows": rows, "skipped": skipped}
    atomic_write_bytes(_sidecar(path), json.dumps(side, sort_keys=True, indent=0).encode())
    return task.index


def _lock(out: Path, part: Optional[str] = None) -> int:
    """An exclusive lock on the output folder (held until the descriptor is closed); for one part of
    a split build (``part``), on that part's lock file only, so the other parts can write meanwhile."""
    import fcntl

    fd = os.open(out / f".{part}.lock", os.O_RDONLY | os.O_CREAT, 0o644) if part else os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(f"{out}: another shard build is writing {'this part ' if part else ''}here") from None
    return fd


def part_tasks(num_tasks: int, part: int, num_parts: int) -> list[int]:
    """The shard numbers part ``part`` of ``num_parts`` builds: every ``num_parts``-th from ``part``
    (disjoint, together all of them, balanced within one shard)."""
    if not 0 <= part < num_parts:
        raise ValueError(f"part {part} outside 0..{num_parts - 1} (--part K --num-parts N: 0 <= K < N)")
    return list(range(part, num_tasks, num_parts))


def _write_classes(out: Path, classes: dict[int, str], table: dict[str, tuple[int, str]]) -> list[dict]:
    """``OUT/classes.tsv`` (label, class, name, imagenet_index); must agree with an existing one."""
    info = []
    for label, cls in sorted(classes.items()):
        idx, name = table.get(cls, (None, ""))
        info.append({"label": label, "class": cls, "name": name, "imagenet_index": idx})
    text = "label\tclass\tname\timagenet_index\n" + "".join(
        "\t".join("" if v is None else str(v) for v in c.values()) + "\n" for c in info)
    path = out / "classes.tsv"
    if path.exists() and path.read_text() != text:
        raise ValueError(f"{path} exists with different classes; write this source into another OUT")
    if not path.exists():  # parts running at once into one OUT all write it (the same text): a temp name each
        atomic_write_bytes(path, text.encode(), shared=True)
    return info


def _plan_tasks(samples: list, class_info: list[dict], out: Path, prefix: str, cfg: APTConfig, shard_size: int,
                settings: dict, strict: bool, validate: bool) -> list[ShardTask]:
    """One `ShardTask` per ``shard_size`` samples, each with the fingerprint its sidecar must match."""
    extra_of = {}
    for c in class_info:
        extra = {"class": c["class"]}
        if c["imagenet_index"] is not None:
            extra.update(wnid=c["class"], class_name=c["name"], imagenet_index=c["imagenet_index"])
        extra_of[c["label"]] = extra
    plan_head = json.dumps({"v": FORMAT_VERSION, "cfg": config_dict(cfg), **settings}, sort_keys=True)
    tasks = []
    for i in range(0, len(samples), shard_size):
        chunk = tuple((str(p), name, key, label, extra_of[label], *map(str, mask))
                      for p, name, key, label, _, *mask in samples[i:i + shard_size])
        sizes = [str(os.path.getsize(p)) if os.path.exists(p) else "-" for p, *_ in chunk]
        fp = digest(plan_head, json.dumps(chunk, sort_keys=True), *sizes)
        tasks.append(ShardTask(len(tasks), str(out / f"{prefix}-{len(tasks):06d}.tar"), fp, chunk, cfg,
                               dict(settings), strict, validate))
    return tasks


def pool_map(fn: Callable, jobs: Sequence, workers: Optional[int], ordered: bool = True) -> Iterator:
    """``fn`` over ``jobs``, here (one worker) or in a fork pool of ``workers`` (default: one per CPU, at
    most one per job) that inherits the compiled kernels (`warmup`); ``ordered=False``: as they finish."""
    workers = max(1, min(workers or len(os.sched_getaffinity(0)), len(jobs)))
    if workers == 1:
        yield from map(fn, jobs)
        return
    from ..scoring.warmup import warmup

    warmup()
    with mp.get_context("fork").Pool(workers) as pool:
        yield from (pool.imap if ordered else pool.imap_unordered)(fn, jobs, chunksize=1)


def _run_tasks(tasks: list[ShardTask], pending: list[ShardTask], mine: set, workers: Optional[int], progress: bool,
               label: str) -> None:
    """Build ``pending``, with a progress bar over the samples of this run's shards ``mine``."""
    from tqdm import tqdm

    total = sum(len(tasks[i].samples) for i in mine)
    with tqdm(total=total, initial=total - sum(len(t.samples) for t in pending), unit="img", desc=label,
              disable=not (progress and sys.stderr.isatty()), file=sys.stderr) as bar:
        for i in pool_map(build_shard, pending, workers, ordered=False):
            bar.update(len(tasks[i].samples))


def build_shards(src: PathLike, out: PathLike, *, image_size: int = 224, shard_size: int = 100,
                 crop: bool = True, cfg: Optional[APTConfig] = None, workers: Optional[int] = None,
                 limit_per_class: Optional[int] = None, skip_per_class: int = 0, prefix: str = "train",
                 seed: int = 0, shuffle: bool = True, quality: int = 95, multiple: Optional[int] = None,
                 classes_tsv: Optional[PathLike] = None, validate: bool = False, strict: bool = False,
                 progress: bool = True, keep_sidecars: bool = True, part: Optional[int] = None,
                 num_parts: int = 1, merge: bool = False, exif_transpose: bool = False,
                 masks: Optional[PathLike] = None, mask_labels: Optional[MaskLabels] = None) -> BuildResult:
    """Build (or finish building) ``OUT/{prefix}-*.tar`` and ``OUT/{prefix}.parquet`` (docs/shards.md).

    Unreadable sources are skipped and counted in ``stats`` (``strict``: `ShardDataError`).
    ``part``/``num_parts`` build every N-th shard only; ``merge`` then checks all and writes the index.
    ``masks``: a folder of masks paired by relative path and stem, stored as ``.seg.png`` (needs
    ``crop=False``); a missing mask is an error, a bad one a skipped source (``bad_mask``).
    """
    t0 = time.perf_counter()
    cfg = cfg or APTConfig()
    src, out = Path(src), Path(out)
    multiple = multiple or cfg.patch_size
    if shard_size < 1 or image_size < 1:
        raise ValueError("shard_size and image_size must be positive")
    if not re.match(r"^[A-Za-z0-9_\-]+$", prefix):
        raise ValueError(f"prefix {prefix!r}: letters, digits, '_' and '-' only")
    if part is not None and merge:
        raise ValueError("a part build (--part) and the merge (--merge) are separate runs")
    left_out: Counter = Counter()
    samples, classes = _plan(src, masks, crop, exif_transpose, limit_per_class, skip_per_class, seed, shuffle,
                             left_out)
    class_table = load_class_table(classes_tsv)
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out, None if part is None else f"{prefix}.part-{part}-of-{num_parts}")
    try:
        class_info = _write_classes(out, classes, class_table)
        settings = {"image_size": image_size, "crop": crop, "multiple": multiple, "jpeg_quality": quality}
        if exif_transpose:  # recorded only when on, so that earlier builds' plans and indexes stay the same
            settings["exif_transpose"] = True
        if masks is not None:  # (likewise)
            ml = mask_labels or MaskLabels()
            settings["masks"] = {"member": "seg.png", "labels": {"reduce_zero_label": ml.reduce_zero_label,
                                                                 "void": [int(v) for v in ml.void]}}
        tasks = _plan_tasks(samples, class_info, out, prefix, cfg, shard_size, settings, strict, validate)
        mine = set(range(len(tasks)) if part is None else part_tasks(len(tasks), part, num_parts))
        _remove_leftovers(out, prefix, mine, part is None, len(tasks))
        done = {t.index for t in tasks if _load_done(t) is not None}
        pending = [t for t in tasks if t.index not in done and t.index in mine]
        if merge and pending:
            raise ValueError(f"{out}: cannot merge, {len(pending)} of {len(tasks)} shards are missing or incomplete "
                             f"({', '.join(Path(t.path).name for t in pending[:5])}{', ...' if len(pending) > 5 else ''}); "
                             "build their parts (--part K --num-parts N) with the same options, into this folder")
        resumed = len(done & mine)
        if resumed:
            log.info("%d of %d shards already complete; building %d", resumed, len(mine), len(pending))
        _run_tasks(tasks, pending, mine, workers, progress, f"make_shards {prefix}")
        if part is None:
            table, stats = _collect(tasks, range(len(tasks)), cfg.num_scales)
            settings.update(prefix=prefix, shards=[Path(t.path).name for t in tasks], num_samples=table.num_rows,
                            classes=class_info, seed=seed, shuffle=shuffle, format="webdataset tar")
            index_path = out / f"{prefix}.parquet"
            write_index(index_path, table, cfg, settings)
            if not keep_sidecars:
                for t in tasks:
                    _sidecar(Path(t.path)).unlink(missing_ok=True)
        else:
            index_path, stats = None, _collect(tasks, sorted(mine))[1]
            (out / f".{prefix}.part-{part}-of-{num_parts}.lock").unlink(missing_ok=True)
    finally:
        os.close(lock)
    res = BuildResult(out=out, index_path=index_path, num_samples=stats.samples, num_shards=len(mine),
                      built=len(pending), resumed=resumed, stats=stats, seconds=time.perf_counter() - t0,
                      left_out=left_out)
    log.debug("build_shards: %s: %s", out, res.summary())  # the caller prints it (tools/make_shards.py)
    return res


def _plan(src: Path, masks: Optional[PathLike], crop: bool, exif_transpose: bool, limit: Optional[int], skip: int,
          seed: int, shuffle: bool, left_out: Optional[Counter] = None) -> tuple[list, dict[int, str]]:
    """The samples of a build (`plan_samples`, or `plan_mask_samples` with ``masks``) and its classes."""
    if masks is not None and (crop or exif_transpose):
        raise ValueError("shards with masks keep the image's aspect and orientation: crop=False "
                         "and no exif_transpose")
    if masks is not None:
        samples, classes = plan_mask_samples(src, Path(masks), limit=limit, skip=skip, seed=seed, shuffle=shuffle)
    else:
        samples, classes = plan_samples(src, limit_per_class=limit, skip_per_class=skip, seed=seed, shuffle=shuffle,
                                        left_out=left_out)
    if not samples:
        raise ValueError(f"{src}: no samples selected")
    return samples, classes


def _remove_leftovers(out: Path, prefix: str, mine: set, whole: bool, num_tasks: int) -> None:
    """Remove .tmp files of a killed run (this run's shards only: other parts may be writing theirs)
    and, for a whole build, shards of an earlier, larger plan."""
    for f in out.glob(f"{prefix}-*"):
        m = re.fullmatch(re.escape(prefix) + r"-(\d{6})\.tar(\.idx\.json)?(\.tmp)?", f.name)
        if m and (int(m.group(1)) in mine if m.group(3) else (whole and int(m.group(1)) >= num_tasks)):
            log.info("removing leftover %s", f)
            f.unlink()


def _collect(tasks: list[ShardTask], which, num_scales: Optional[int] = None):
    """The sidecars of shards ``which``: ``(index table or None, stats)``; the table (``num_scales``
    given) is built one sidecar at a time, so the index of a large set stays columnar."""
    import pyarrow as pa

    stats, tables = ShardStats(), []
    for i in which:
        side = _load_done(tasks[i])
        if side is None:
            raise RuntimeError(f"{tasks[i].path}: shard or sidecar changed while this run was writing")
        stats.samples += len(side["rows"])
        if num_scales is not None:
            tables.append(index_table(side["rows"], num_scales))
        for s in side["skipped"]:
            if num_scales is not None:
                log.warning("skipped %s (key %s, shard %s): %s (%s)", s["source"], s["key"], side["shard"],
                            s["reason"], s["detail"])
            stats.skip(side["shard"], s["key"], s["reason"], f"{s['source']}: {s['detail']}")
    return (pa.concat_tables(tables) if tables else None), stats
