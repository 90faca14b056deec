#!/usr/bin/env python
"""Build webdataset shards + a Parquet index (with APT score maps and token counts) from images.

    python tools/make_shards.py SRC OUT --image-size 224 --shard-size 100 [--crop | --keep-aspect]
        [--patch-size 16 --num-scales 3 --thresholds 5.5 4.0 --scorer entropy] [--workers N]
        [--limit-per-class K] [--skip-per-class N] [--prefix train] [--seed 0] [--no-shuffle]
        [--classes imagenet-classes.tsv] [--validate] [--strict] [--remove-sidecars]

SRC is an ImageNet-layout folder (one sub-folder per class) or a text/TSV list
(``path<TAB>label[<TAB>class]``). Writes ``OUT/{prefix}-000000.tar, ...``, ``OUT/{prefix}.parquet``
and ``OUT/classes.tsv``. Each shard is written to ``.tmp``, fsynced and renamed; then its sidecar
``.tar.idx.json`` (rows + skipped sources) is written the same way, and only a shard with a
matching sidecar counts as done, so a killed run leaves no partial .tar and a rerun redoes only
what is missing. The index is built at the end from the sidecars. See docs/shards.md.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from apt_data import APTConfig, warmup  # noqa: E402
from apt_data.shards import (  # noqa: E402
    FORMAT_VERSION, ShardDataError, ShardStats, ShardWriter, SourceError, atomic_write_bytes, config_dict,
    encode_sample, index_row, index_table, iter_shard, list_image_folder, read_file_list, sample_meta, write_index)

log = logging.getLogger("make_shards")

SIDECAR = ".idx.json"


@dataclass(frozen=True)
class ShardTask:
    """Everything a worker needs to write one shard (picklable, no open resources)."""

    index: int
    path: str
    fingerprint: str
    samples: tuple  # of (source path, source name, key, label, extra meta dict)
    cfg: APTConfig
    image_size: int
    crop: bool
    multiple: int
    quality: int
    strict: bool
    validate: bool


@dataclass
class MakeShardsResult:
    """What a run did: totals, shards built vs. reused, skipped sources (``stats``)."""

    out: Path
    index_path: Path
    num_samples: int
    num_shards: int
    built: int
    resumed: int
    stats: ShardStats = field(default_factory=ShardStats)
    seconds: float = 0.0


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def make_key(name: str) -> str:
    """A webdataset key from a source's relative path: no extension, no dots, '/' -> '_'."""
    stem = name.rsplit(".", 1)[0] if "." in Path(name).name else name
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", stem.replace("/", "_")).lstrip("_-") or "x"
    return key if len(key) <= 80 else key[:63] + "_" + _digest(name)[:16]


def load_class_table(path: Optional[str]) -> dict[str, tuple[int, str]]:
    """``wnid -> (ImageNet-1k index, name)`` from a TSV with columns index, wnid, name (header ok)."""
    if not path:
        return {}
    table = {}
    for line in Path(path).read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[0].strip().isdigit():
            table[parts[1].strip()] = (int(parts[0]), parts[2].strip())
    return table


def plan_samples(src: Path, *, limit_per_class: Optional[int], skip_per_class: int, seed: int,
                 shuffle: bool) -> tuple[list[tuple[Path, str, str, int, str]], dict[int, str]]:
    """Pick and order the samples: ``[(path, source name, key, label, class)]`` and label -> class.

    Per class, files are ranked by sha256(seed, name) and ``[skip : skip + limit]`` taken, so
    disjoint splits come from the same seed with different skips, and adding files elsewhere does
    not change a pick. Then the order is the sorted one, or a seeded hash order (``shuffle``)
    so every shard mixes classes. Keys are unique.
    """
    if src.is_dir():
        entries = list_image_folder(src)
        base = src
    else:
        entries = read_file_list(src)
        base = src.parent
    classes: dict[int, str] = {}
    by_label: dict[int, list] = {}
    for path, label, cls in entries:
        name = Path(os.path.relpath(path, base)).as_posix()
        classes.setdefault(label, cls)
        by_label.setdefault(label, []).append((path, name, label, cls))
    picked = []
    for label in sorted(by_label):
        items = sorted(by_label[label], key=lambda t: _digest(str(seed), t[1]))
        stop = None if limit_per_class is None else skip_per_class + limit_per_class
        picked.extend(items[skip_per_class:stop])
    seen: dict[str, int] = {}
    samples = []
    for path, name, label, cls in sorted(picked, key=lambda t: (t[2], t[1])):
        key = make_key(name)
        n = seen.get(key, 0)
        seen[key] = n + 1
        samples.append((path, name, key if n == 0 else f"{key}-{n}", label, cls))
    if shuffle:
        samples.sort(key=lambda t: _digest(str(seed), "order", t[2]))
    return samples, classes


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
    path = Path(task.path)
    rows, skipped = [], []
    writer = ShardWriter(path)
    try:
        for src_path, name, key, label, extra in task.samples:
            try:
                enc = encode_sample(src_path, task.cfg, task.image_size, crop=task.crop,
                                    multiple=task.multiple, quality=task.quality, name=name)
            except SourceError as e:
                if task.strict:
                    raise ShardDataError(name, key, e.reason, e.detail) from None
                skipped.append({"source": name, "key": key, "reason": e.reason, "detail": e.detail[:300]})
                continue
            meta = sample_meta(key, enc, task.cfg, label=label, source=name, crop=task.crop,
                               quality=task.quality, extra=extra)
            offsets = writer.write_sample(key, enc.jpeg, label, meta, enc.scores)
            rows.append(index_row(key, path.name, meta, offsets))
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


def _lock(out: Path) -> int:
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(f"{out}: another make_shards run is writing here") from None
    return fd


def _write_classes(out: Path, classes: dict[int, str], table: dict[str, tuple[int, str]]) -> list[dict]:
    """``OUT/classes.tsv`` (label, class, name, imagenet_index); must agree with an existing one."""
    info = []
    for label in sorted(classes):
        cls = classes[label]
        idx, name = table.get(cls, (None, ""))
        info.append({"label": label, "class": cls, "name": name, "imagenet_index": idx})
    text = "label\tclass\tname\timagenet_index\n" + "".join(
        f"{c['label']}\t{c['class']}\t{c['name']}\t{'' if c['imagenet_index'] is None else c['imagenet_index']}\n"
        for c in info)
    path = out / "classes.tsv"
    if path.exists() and path.read_text() != text:
        raise ValueError(f"{path} exists with different classes; write this source into another OUT")
    if not path.exists():
        atomic_write_bytes(path, text.encode())
    return info


def make_shards(src: os.PathLike | str, out: os.PathLike | str, *, image_size: int = 224, shard_size: int = 100,
                crop: bool = True, cfg: Optional[APTConfig] = None, workers: Optional[int] = None,
                limit_per_class: Optional[int] = None, skip_per_class: int = 0, prefix: str = "train",
                seed: int = 0, shuffle: bool = True, quality: int = 95, multiple: Optional[int] = None,
                classes_tsv: Optional[str] = None, validate: bool = False, strict: bool = False,
                progress: bool = True, keep_sidecars: bool = True) -> MakeShardsResult:
    """Build (or finish building) ``OUT/{prefix}-*.tar`` and ``OUT/{prefix}.parquet``; see the module doc."""
    t0 = time.perf_counter()
    cfg = cfg or APTConfig()
    src, out = Path(src), Path(out)
    multiple = multiple or cfg.patch_size
    if shard_size < 1 or image_size < 1:
        raise ValueError("shard_size and image_size must be positive")
    if not re.match(r"^[A-Za-z0-9_\-]+$", prefix):
        raise ValueError(f"prefix {prefix!r}: letters, digits, '_' and '-' only")
    samples, classes = plan_samples(src, limit_per_class=limit_per_class, skip_per_class=skip_per_class,
                                    seed=seed, shuffle=shuffle)
    if not samples:
        raise ValueError(f"{src}: no samples selected")
    class_table = load_class_table(classes_tsv)
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        class_info = _write_classes(out, classes, class_table)
        extra_of = {}
        for c in class_info:
            extra = {"class": c["class"]}
            if c["imagenet_index"] is not None:
                extra.update(wnid=c["class"], class_name=c["name"], imagenet_index=c["imagenet_index"])
            extra_of[c["label"]] = extra
        settings = {"image_size": image_size, "crop": crop, "multiple": multiple, "jpeg_quality": quality}
        plan_head = json.dumps({"v": FORMAT_VERSION, "cfg": config_dict(cfg), **settings}, sort_keys=True)
        tasks = []
        for i in range(0, len(samples), shard_size):
            chunk = tuple((str(p), name, key, label, extra_of[label]) for p, name, key, label, _ in samples[i:i + shard_size])
            sizes = [str(os.path.getsize(p)) if os.path.exists(p) else "-" for p, *_ in chunk]
            fp = _digest(plan_head, json.dumps(chunk, sort_keys=True), *sizes)
            tasks.append(ShardTask(len(tasks), str(out / f"{prefix}-{len(tasks):06d}.tar"), fp, chunk, cfg,
                                   image_size, crop, multiple, quality, strict, validate))
        # leftovers: .tmp files of a killed run, and shards of an earlier, larger plan
        for f in out.glob(f"{prefix}-*"):
            m = re.fullmatch(re.escape(prefix) + r"-(\d{6})\.tar(\.idx\.json)?(\.tmp)?", f.name)
            if m and (m.group(3) or int(m.group(1)) >= len(tasks)):
                log.info("removing leftover %s", f)
                f.unlink()
        done = {t.index for t in tasks if _load_done(t) is not None}
        pending = [t for t in tasks if t.index not in done]
        resumed = len(done)
        if resumed:
            log.info("%d of %d shards already complete; building %d", resumed, len(tasks), len(pending))
        workers = max(1, min(workers or len(os.sched_getaffinity(0)), len(pending) or 1))
        from tqdm import tqdm

        bar = tqdm(total=len(samples), initial=sum(len(tasks[i].samples) for i in done), unit="img",
                   desc=f"make_shards {prefix}", disable=not progress, file=sys.stderr)
        try:
            if workers == 1:
                results = (build_shard(t) for t in pending)
                pool = None
            else:
                warmup()  # compiled kernels loaded once, inherited by the forked workers
                pool = mp.get_context("fork").Pool(workers)
                results = pool.imap_unordered(build_shard, pending, chunksize=1)
            try:
                for i in results:
                    done.add(i)
                    bar.update(len(tasks[i].samples))
            finally:
                if pool is not None:
                    pool.terminate()
                    pool.join()
        finally:
            bar.close()
        stats = ShardStats()
        tables = []
        for t in tasks:  # one sidecar in memory at a time: the index of a large set stays columnar
            side = _load_done(t)
            if side is None:
                raise RuntimeError(f"{t.path}: shard or sidecar changed while this run was writing")
            tables.append(index_table(side["rows"], cfg.num_scales))
            for s in side["skipped"]:
                log.warning("skipped %s (key %s, shard %s): %s (%s)", s["source"], s["key"], side["shard"],
                            s["reason"], s["detail"])
                stats.skip(side["shard"], s["key"], s["reason"], f"{s['source']}: {s['detail']}")
        table = pa.concat_tables(tables)
        stats.samples = table.num_rows
        settings.update(prefix=prefix, shards=[Path(t.path).name for t in tasks], num_samples=table.num_rows,
                        classes=class_info, seed=seed, shuffle=shuffle, format="webdataset tar")
        index_path = out / f"{prefix}.parquet"
        write_index(index_path, table, cfg, settings)
        if not keep_sidecars:
            for t in tasks:
                _sidecar(Path(t.path)).unlink(missing_ok=True)
    finally:
        os.close(lock)
    res = MakeShardsResult(out=out, index_path=index_path, num_samples=table.num_rows, num_shards=len(tasks),
                           built=len(pending), resumed=resumed, stats=stats, seconds=time.perf_counter() - t0)
    log.info("make_shards: %s: %d samples in %d shards (%d built, %d already complete), %s; index %s; %.1f s",
             out, res.num_samples, res.num_shards, res.built, res.resumed, stats.summary(), index_path, res.seconds)
    return res


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="ImageNet-layout folder, or a text/TSV list: path<TAB>label[<TAB>class]")
    ap.add_argument("out", help="output folder")
    ap.add_argument("--image-size", type=int, default=224, help="stored size (crop: side; keep-aspect: short side)")
    ap.add_argument("--shard-size", type=int, default=100, help="samples per shard")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--crop", dest="crop", action="store_true", default=True, help="resize + centre-crop to a square (default)")
    g.add_argument("--keep-aspect", dest="crop", action="store_false", help="short side = image size, sides multiples of --multiple")
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--num-scales", type=int, default=3)
    ap.add_argument("--thresholds", type=float, nargs="*", default=None, help="default: APTConfig's (5.5 4.0)")
    ap.add_argument("--scorer", default="entropy")
    ap.add_argument("--multiple", type=int, default=None, help="--keep-aspect side rounding (default: patch size)")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    ap.add_argument("--limit-per-class", type=int, default=None, help="take K images per class")
    ap.add_argument("--skip-per-class", type=int, default=0, help="after skipping N per class (disjoint splits)")
    ap.add_argument("--prefix", default="train", help="shard name prefix and index name (OUT/PREFIX.parquet)")
    ap.add_argument("--seed", type=int, default=0, help="picks per class and the sample order")
    ap.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="keep sorted (class, file) order")
    ap.add_argument("--classes", default=None, help="TSV index<TAB>wnid<TAB>name (ImageNet-1k) to record in the metadata")
    ap.add_argument("--validate", action="store_true", help="re-read each shard, decoding every JPEG, before it counts as done")
    ap.add_argument("--strict", action="store_true", help="stop at the first unreadable source instead of skipping it")
    ap.add_argument("--remove-sidecars", dest="keep_sidecars", action="store_false",
                    help="delete the per-shard .idx.json files once the index is written (a rerun then rebuilds)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    kw = {} if a.thresholds is None else {"thresholds": tuple(a.thresholds)}
    try:
        cfg = APTConfig(patch_size=a.patch_size, num_scales=a.num_scales, scorer=a.scorer, **kw)
        res = make_shards(a.src, a.out, image_size=a.image_size, shard_size=a.shard_size, crop=a.crop, cfg=cfg,
                          workers=a.workers, limit_per_class=a.limit_per_class, skip_per_class=a.skip_per_class,
                          prefix=a.prefix, seed=a.seed, shuffle=a.shuffle, quality=a.quality, multiple=a.multiple,
                          classes_tsv=a.classes, validate=a.validate, strict=a.strict, progress=not a.quiet,
                          keep_sidecars=a.keep_sidecars)
    except (ValueError, RuntimeError, OSError) as e:
        log.error("make_shards: error: %s", e)
        return 2
    print(f"make_shards: {res.num_samples} samples in {res.num_shards} shards ({res.built} built, "
          f"{res.resumed} already complete); {res.stats.summary()}; index {res.index_path}")
    return 0 if res.num_samples else 1


if __name__ == "__main__":
    sys.exit(main())
