#!/usr/bin/env python
"""Benchmark: APTLoader against a plain decode + resize + collate loader, same data, same workers.

    python tools/bench_loader.py [--source shards] [--max-tokens 4096] [--workers 2] [--epochs 3]

Prints the packing fill (real tokens / budget; prefix tokens count as real) and images/s of both
loaders in the same run. The plain loader is what a timm user runs today: a torch DataLoader over
the same samples, each decoded and resized by the same `ImageTransform`, default-collated into
fixed-size uint8 batches of the APT loader's mean images per batch. Targets (issue 4): fill >= 99%,
APT images/s >= 0.95x the plain loader's.
"""
from __future__ import annotations

import argparse
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


def time_epochs(make_iter, epochs: int) -> tuple[float, int]:
    """Best images/s over ``epochs`` passes (the first warms the page cache and workers)."""
    best, n_images = 0.0, 0
    for _ in range(epochs):
        t0, n = time.perf_counter(), 0
        for batch in make_iter():
            n += batch
        dt = time.perf_counter() - t0
        best, n_images = max(best, n / dt), n
    return best, n_images


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(ROOT / "shards"))
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
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

    apt_ips, n = time_epochs(apt_iter, args.epochs)
    plain_ips, _ = time_epochs(plain_iter, args.epochs)
    print(f"# bench_loader: {len(source)} samples from {args.source} x{args.repeat} per epoch, {args.workers} workers, "
          f"{args.image_size}px, max_tokens {args.max_tokens}, planning from "
          f"{'exact index token counts' if apt.exact_counts else 'uniform-grid upper bounds'}")
    print("| loader | images/s | images/batch | fill (real tokens / budget) |")
    print("|---|---|---|---|")
    print(f"| plain decode+resize+collate | {plain_ips:.0f} | {bs} | - |")
    print(f"| APTLoader | {apt_ips:.0f} | {np.mean(imgs_per_batch):.1f} | {np.mean(fills):.2%} "
          f"(all batches; {np.mean(fills[:-1]) if len(fills) > 1 else np.mean(fills):.2%} without the last) |")
    print(f"APT / plain images/s: {apt_ips / plain_ips:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
