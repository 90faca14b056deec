#!/usr/bin/env python
"""Benchmark: APTLoader against a plain decode + resize + collate loader, same data, same workers.

    python tools/bench_loader.py [--source shards] [--max-tokens 4096] [--workers 2] [--epochs 5]

Prints the packing fill (real tokens / budget; prefix tokens count as real) and images/s of both
loaders in the same run. The plain loader is what a timm user runs today: a torch DataLoader over
the same samples (read with the same one-seek source, JPEG bytes only), each decoded and resized
by the same `ImageTransform`, default-collated into fixed-size uint8 batches of the APT loader's
mean images per batch. The loaders alternate, ``--epochs`` timed passes each (after one warm-up
pass each), and the medians are reported, with the CPU time per image of the main process and
its workers (steadier than images/s when other jobs share the cores). Targets (issue 4):
fill >= 99%, APT images/s >= 0.95x the plain loader's.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from apt_data import APTConfig, warmup  # noqa: E402
from apt_data.loader import APTLoader, open_source  # noqa: E402
from apt_data.transforms import ImageTransform  # noqa: E402


class PlainDataset(Dataset):
    def __init__(self, source, transform: ImageTransform):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        img = self.transform(self.source.read(i), self.source.keys[i])
        return torch.from_numpy(np.array(img)).permute(2, 0, 1), int(self.source.labels[i])


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the loaders' worker processes)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed_pass(make_iter) -> tuple[float, float]:
    """(images/s, CPU microseconds per image: main process + workers) of one pass over ``make_iter()``."""
    c0, t0, n = cpu_seconds(), time.perf_counter(), 0
    for batch in make_iter():
        n += batch
    return n / (time.perf_counter() - t0), (cpu_seconds() - c0) / n * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(ROOT / "shards"))
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=5, help="timed passes per loader (alternating)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--repeat", type=int, default=4, help="passes over the source per timed epoch")
    args = ap.parse_args(argv)

    warmup()
    cfg = APTConfig()
    src_path = Path(args.source)
    if src_path.is_dir() and not any(p.is_dir() or p.suffix == ".parquet" for p in src_path.iterdir()):
        # a flat folder of photos: present it as one class (ImageNet layout) through symlinks
        import tempfile
        tmp = Path(tempfile.mkdtemp(prefix="bench_loader_")) / "all"
        tmp.mkdir()
        for p in src_path.iterdir():
            if p.suffix.lower() in (".jpg", ".jpeg", ".png"):
                (tmp / p.name).symlink_to(p.resolve())
        args.source = str(tmp.parent)
    source = open_source(args.source)
    tr = ImageTransform(size=args.image_size, multiple=cfg.patch_size)
    apt = APTLoader(source, cfg, max_tokens=args.max_tokens, num_workers=args.workers, transform=tr, seed=0,
                    pin_memory=False)
    fills, imgs_per_batch = [], []
    for batch, _ in apt:
        fills.append(batch.num_real_tokens / args.max_tokens)
        imgs_per_batch.append(batch.num_images)
    bs = max(1, round(float(np.mean(imgs_per_batch))))

    def apt_iter():
        for e in range(args.repeat):
            apt.set_epoch(e)
            for batch, _ in apt:
                yield batch.num_images

    plain = DataLoader(PlainDataset(source, tr), batch_size=bs, shuffle=True, num_workers=args.workers,
                       persistent_workers=False, drop_last=False)

    def plain_iter():
        for _ in range(args.repeat):
            for x, _ in plain:
                yield x.shape[0]

    # alternate the two loaders, so that the other processes of a shared machine slow both alike
    timed_pass(apt_iter), timed_pass(plain_iter)  # warm-up: page cache, code
    apt_runs, plain_runs = [], []
    for _ in range(args.epochs):
        apt_runs.append(timed_pass(apt_iter))
        plain_runs.append(timed_pass(plain_iter))
    (apt_ips, apt_cpu), (plain_ips, plain_cpu) = np.median(apt_runs, 0), np.median(plain_runs, 0)
    ratios = np.array([a[0] / p[0] for a, p in zip(apt_runs, plain_runs)])
    total = sum(f * args.max_tokens for f in fills)  # real tokens of an epoch
    best_batches = int(np.ceil(total / args.max_tokens - 1e-9))
    best_fill = total / (best_batches * args.max_tokens)  # the fill of the fewest batches that can hold them
    print(f"# bench_loader: {len(source)} samples from {args.source} x{args.repeat} per timed pass, "
          f"{args.workers} workers, "
          f"{args.image_size}px, max_tokens {args.max_tokens}, planning from "
          f"{'exact index token counts' if apt.exact_counts else 'uniform-grid upper bounds'}; "
          f"{args.epochs} alternating timed passes per loader, medians")
    print("| loader | images/s | CPU us/image (main + workers) | images/batch | fill (real tokens / budget) |")
    print("|---|---|---|---|---|")
    print(f"| plain decode+resize+collate | {plain_ips:.0f} | {plain_cpu:.0f} | {bs} | - |")
    print(f"| APTLoader | {apt_ips:.0f} | {apt_cpu:.0f} | {np.mean(imgs_per_batch):.1f} | {np.mean(fills):.2%} "
          f"(all batches; {np.mean(fills[:-1]) if len(fills) > 1 else np.mean(fills):.2%} without the last; "
          f"lowest {min(fills):.2%}; {len(fills)} batches, {best_batches} at least, so at most {best_fill:.2%}) |")
    print(f"APT / plain images/s: {apt_ips / plain_ips:.3f}x (per pass: {', '.join(f'{r:.3f}' for r in ratios)}; "
          f"median {np.median(ratios):.3f}x); plain / APT CPU per image: {plain_cpu / apt_cpu:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
