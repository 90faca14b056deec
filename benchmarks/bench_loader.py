#!/usr/bin/env python
"""Benchmark: APTLoader against a plain decode + transform + collate loader, same data, same workers.

    python benchmarks/bench_loader.py [--source shards] [--max-tokens 4096] [--workers 2] [--epochs 5]
    python benchmarks/bench_loader.py --fill [bench_fill.py's options]   # = python benchmarks/bench_fill.py
    python benchmarks/bench_loader.py --remote [bench_remote.py's options]   # = python benchmarks/bench_remote.py
    python benchmarks/bench_loader.py --first-epoch --source DIR [--copies 4] [--image-size 384] [--trials 3]

``--first-epoch``: a fresh APTLoader over an image folder (``--copies`` copies of it, as symlinks),
for the resize-only and the augmented pipeline in turn: images/s of its first epoch, timed from the
loader's construction (so the epoch-length probe and the workers' start count; the process's
one-time set-up, `apt_data.warmup()` and one run of each transform, comes before), against its
later epochs, and their ratio.

Prints the packing fill (real tokens / budget; prefix tokens count as real) and images/s of the
loaders in the same run, for two pipelines:

- resize only (the eval transform): APTLoader (planned from the index's exact token counts when
  the source has them) against the plain loader;
- augmented training (the transform `apt_train.build.train_transform` builds for the ``full`` and
  ``sample`` recipes: RandomResizedCrop + flip + RandAugment ``rand-m9-mstd0.5-inc1`` + random
  erasing 0.25): APTLoader planning from uniform-grid upper bounds (``packing="plan"``, the old
  way), APTLoader streaming by real token counts (``packing="stream"``), and the plain loader.

The plain loader is what a timm user runs today: a torch DataLoader over the same samples (read
with the same one-seek source, JPEG bytes only), each decoded and transformed by the same
`ImageTransform`, default-collated into fixed-size uint8 batches of the APT loader's mean images
per batch. Every loader first runs one warm-up pass (``--repeat`` epochs), whose batches give the
fill: the mean over every batch, and without at most one partial batch per worker and epoch (its
last: see benchmarks/bench_fill.py). Then the loaders alternate, ``--epochs`` timed passes each, and the
medians are reported, with the CPU time per image of the main process and its workers (steadier
than images/s when other jobs share the cores). A streamed training epoch is a fixed number of
batches (under one pass: the rest carries over), so images/s, not time per epoch, compares them.
Targets (issue 4): fill >= 99%, APT images/s >= 0.95x the plain loader's.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from apt_data import APTConfig, warmup
from apt_data.loader import APTLoader
from apt_data.sources import open_source
from apt_data.transforms import ImageTransform
from bench_common import ROOT, CpuClock


class PlainDataset(Dataset):
    def __init__(self, source, transform: ImageTransform):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        seed = int(np.random.SeedSequence([i, torch.initial_seed() % 2**32]).generate_state(1)[0])
        img = self.transform(self.source.read(i), self.source.keys[i], seed=seed)  # (ignored without augment)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1), int(self.source.labels[i])


def timed_pass(make_iter) -> tuple[float, float]:
    """(images/s, CPU microseconds per image: main process + workers) of one pass over ``make_iter()``."""
    clock = CpuClock()
    clock.start()
    t0, n = time.perf_counter(), 0
    for batch in make_iter():
        n += batch
    return n / (time.perf_counter() - t0), clock.stop() / n * 1e6


def fill_text(eps: list, budget: int) -> str:
    """Mean fill over every batch of ``eps`` (`bench_fill.EpochFill`), without each worker's last batch, lowest."""
    fills = [f for ep in eps for f in ep.fills]
    kept = [f for ep in eps for f in ep.without_partials()]
    total = sum(fills) * budget / len(eps)  # real tokens of an epoch
    best = int(np.ceil(total / budget - 1e-9))
    return (f"{np.mean(fills):.2%} (all {len(fills)} batches of {len(eps)} epoch(s)); {np.mean(kept):.2%} without "
            f"<= 1 partial per worker; lowest {min(fills):.2%}; the fewest batches for an epoch's tokens: {best}, "
            f"at most {total / (best * budget):.2%}")


def photo_folder(src: Path, copies: int) -> Path:
    """An ImageNet-layout folder of ``copies`` symlinked copies of every photo under ``src`` (one class per copy)."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="bench_first_epoch_"))
    photos = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    for c in range(copies):
        (root / f"copy{c}").mkdir()
        for p in photos:
            (root / f"copy{c}" / f"{p.parent.name}_{p.name}").symlink_to(p.resolve())
    return root


def first_epoch(args) -> int:
    """Fresh loaders: first-epoch images/s (from construction) against later epochs', per pipeline."""
    from bench_fill import augmented_transform

    print("# command: " + " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]))
    folder = photo_folder(Path(args.source), args.copies)
    cfg = APTConfig()
    pipelines = {"resize only (eval transform)": ImageTransform(size=args.image_size, multiple=cfg.patch_size),
                 "augmented training": augmented_transform(args.image_size, cfg.patch_size)}
    warmup()  # the process's one-time set-up, as in every bench (a trainer has it before its loader starts):
    photo = next(p for p in sorted(folder.rglob("*")) if p.is_file())
    for tr in pipelines.values():  # compiled kernels loaded, each transform run once (timm's RandAugment built)
        tr(str(photo), seed=0)
    print(f"# {len(open_source(str(folder)))} photos ({args.copies} x {args.source}), {args.image_size} px, "
          f"max_tokens {args.max_tokens}, {args.workers} workers, streamed training epochs; first epoch timed from "
          f"APTLoader(...), later epochs {args.epochs} (median); medians of {args.trials} fresh loaders each")
    print("| pipeline | first epoch images/s | later epochs images/s | first / later (per trial) |")
    print("|---|---|---|---|")
    for name, tr in pipelines.items():
        first, later = [], []
        for _ in range(args.trials):  # a fresh loader each: its first epoch, then its later ones
            rates = epoch_rates(str(folder), cfg, tr, args)
            first.append(rates[0])
            later.append(float(np.median(rates[1:])))
        ratios = [f / v for f, v in zip(first, later)]
        print(f"| {name} | {np.median(first):.0f} | {np.median(later):.0f} | {np.median(ratios):.2f}x "
              f"({', '.join(f'{r:.2f}' for r in ratios)}) |")
    return 0


def epoch_rates(folder: str, cfg, tr, args) -> list[float]:
    """Images/s of a fresh loader's epochs, the first timed from its construction."""
    t0 = time.perf_counter()
    loader = APTLoader(folder, cfg, transform=tr, max_tokens=args.max_tokens, num_workers=args.workers,
                       pin_memory=False)
    rates = []
    for epoch in range(1 + args.epochs):
        loader.set_epoch(epoch)
        n = sum(batch.num_images for batch, _ in loader)
        t1 = time.perf_counter()
        rates.append(n / (t1 - t0))
        t0 = t1
    getattr(loader, "close", lambda: None)()  # (a loader from before `close` keeps its workers until collected)
    return rates


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(ROOT / "shards"))
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=5, help="timed passes per loader (alternating)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--repeat", type=int, default=4, help="epochs per timed pass")
    ap.add_argument("--no-train", action="store_true", help="skip the augmented training loaders")
    ap.add_argument("--no-eval", action="store_true", help="skip the resize-only (eval transform) loaders")
    ap.add_argument("--checksums", action="store_true",
                    help="also time the APT loaders over shards with member checksum verification off")
    ap.add_argument("--fill", action="store_true",
                    help="print benchmarks/bench_fill.py's fill table instead (remaining arguments go to it)")
    ap.add_argument("--remote", action="store_true",
                    help="time local disk against HTTP instead: benchmarks/bench_remote.py (remaining arguments go to it)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--fill" in argv:  # every other argument is bench_fill.py's
        from bench_fill import main as fill_main

        return fill_main([a for a in argv if a != "--fill"])
    if "--remote" in argv:  # every other argument is bench_remote.py's (run, not imported: no import circle)
        import runpy

        sys.argv = [str(Path(__file__).with_name("bench_remote.py"))] + [a for a in argv if a != "--remote"]
        runpy.run_path(sys.argv[0], run_name="__main__")
        return 0
    ap.add_argument("--first-epoch", action="store_true",
                    help="images/s of a fresh loader's first epoch against its later ones (an image folder)")
    ap.add_argument("--copies", type=int, default=1, help="--first-epoch: copies of the folder's photos")
    ap.add_argument("--trials", type=int, default=3, help="--first-epoch: fresh loaders per pipeline (medians)")
    args = ap.parse_args(argv)
    if args.first_epoch:
        return first_epoch(args)
    print("# command: " + " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]))
    src_path = Path(args.source)
    if src_path.is_dir() and not any(p.is_dir() or p.suffix == ".parquet" for p in src_path.iterdir()):
        args.source = str(photo_folder(src_path, 1))  # a flat folder of photos: one class, through symlinks
    runs = loaders(args, ap)
    report(args, runs)
    return 0


class Runs(dict):
    """The loaders to time, each after its warm-up pass: name -> (make_iter, row label, images/batch, fill text)."""

    def __init__(self, args):
        super().__init__()
        self.args, self.epoch_of = args, {}

    def apt_iter(self, loader, name):
        def it():
            for _ in range(self.args.repeat):
                loader.set_epoch(self.epoch_of[name])
                self.epoch_of[name] += 1
                for batch, _ in loader:
                    yield batch.num_images
        return it

    def add_apt(self, name, label, loader) -> float:
        from bench_fill import epoch_fills

        eps = epoch_fills(loader, self.args.repeat)  # the warm-up pass, fills measured
        self.epoch_of[name] = self.args.repeat
        per_batch = sum(ep.images for ep in eps) / sum(len(ep.fills) for ep in eps)
        self[name] = (self.apt_iter(loader, name), label, per_batch, fill_text(eps, self.args.max_tokens))
        return per_batch

    def add_plain(self, name, label, source, transform, per_batch) -> None:
        bs = max(1, round(per_batch))
        dl = DataLoader(PlainDataset(source, transform), batch_size=bs, shuffle=True, num_workers=self.args.workers,
                        persistent_workers=False, drop_last=False)

        def it():
            for _ in range(self.args.repeat):
                for x, _ in dl:
                    yield x.shape[0]
        for _ in it():  # warm-up pass
            pass
        self[name] = (it, label, bs, "-")


def unverified(path: str):
    """The same shards, read without verifying member checksums (the index's columns dropped)."""
    other = open_source(path)
    other._crc = {}
    return other


def loaders(args, ap) -> Runs:
    """The loaders to time, each after its warm-up pass, and the table's header parts (``runs.header``)."""
    from bench_fill import augmented_transform

    warmup()
    cfg = APTConfig()
    source = open_source(args.source)
    kw = dict(max_tokens=args.max_tokens, num_workers=args.workers, seed=0, pin_memory=False)
    if args.checksums and not getattr(source, "_crc", None):
        ap.error("--checksums: the source is not a shard set whose index has member checksums")
    runs, runs.header = Runs(args), []
    if not args.no_eval:
        tr = ImageTransform(size=args.image_size, multiple=cfg.patch_size)
        apt = APTLoader(source, cfg, transform=tr, **kw)
        how = apt.describe()
        per_batch = runs.add_apt("eval_apt", f"APTLoader ({how})", apt)
        if args.checksums:
            runs.add_apt("eval_apt_nocrc", f"APTLoader ({how}), checksums not verified",
                         APTLoader(unverified(args.source), cfg, transform=tr, **kw))
        runs.add_plain("eval_plain", "plain decode+resize+collate", source, tr, per_batch)
        runs.header.append(f"resize only: APTLoader {how}")
    if not args.no_train:
        aug = augmented_transform(args.image_size, cfg.patch_size)
        stream = APTLoader(source, cfg, transform=aug, packing="stream", **kw)
        plan = APTLoader(source, cfg, transform=aug, packing="plan", **kw)
        runs.add_apt("train_plan", "APTLoader, `packing=\"plan\"` (uniform-grid upper bounds)", plan)
        per_batch = runs.add_apt("train_stream", "APTLoader, `packing=\"stream\"` (real token counts)", stream)
        if args.checksums:
            runs.add_apt("train_stream_nocrc", "APTLoader, `packing=\"stream\"`, checksums not verified",
                         APTLoader(unverified(args.source), cfg, transform=aug, packing="stream", **kw))
        runs.add_plain("train_plain", "plain decode+augment+collate", source, aug, per_batch)
        runs.header.append(f"augmented training (RandomResizedCrop + flip + RandAugment {aug.auto_augment} + random "
                           f"erasing {aug.re_prob}): {stream.steps_per_epoch()} streamed vs {plan.steps_per_epoch()} "
                           "planned batches per epoch")
    return runs


def report(args, runs: Runs) -> None:
    """Time the loaders, alternating (so that the other processes of a shared machine slow all alike),
    and print the table and the ratios."""
    header = runs.header
    source = open_source(args.source)
    timed = {name: [] for name in runs}
    for _ in range(args.epochs):
        for name, (make_iter, *_) in runs.items():
            timed[name].append(timed_pass(make_iter))
    med = {name: np.median(v, 0) for name, v in timed.items()}
    print(f"# bench_loader: {len(source)} samples from {args.source}, {args.repeat} epochs per timed pass, "
          f"{args.workers} workers, {args.image_size}px, max_tokens {args.max_tokens}; {args.epochs} alternating "
          f"timed passes per loader, medians (after one warm-up pass each, whose batches give the fill); "
          + "; ".join(header))
    print("| pipeline | loader | images/s | CPU us/image (main + workers) | images/batch | fill (real tokens / budget) |")
    print("|---|---|---|---|---|---|")
    for name, (_, label, per_batch, fill) in runs.items():
        ips, cpu = med[name]
        pipeline = "resize only (eval transform)" if name.startswith("eval") else "augmented training"
        print(f"| {pipeline} | {label} | {ips:.0f} | {cpu:.0f} | {per_batch:.1f} | {fill} |")

    def ratio(a, b, what):
        if a in timed and b in timed:
            r = np.array([x[0] / y[0] for x, y in zip(timed[a], timed[b])])
            print(f"{what} images/s: {med[a][0] / med[b][0]:.3f}x (per pass: {', '.join(f'{v:.3f}' for v in r)}; "
                  f"median {np.median(r):.3f}x); CPU per image {med[a][1] / med[b][1]:.3f}x")

    ratio("eval_apt", "eval_plain", "resize only, APT / plain")
    ratio("train_stream", "train_plan", "augmented training, stream / plan")
    ratio("train_stream", "train_plain", "augmented training, stream / plain")
    ratio("eval_apt", "eval_apt_nocrc", "resize only, checksums on / off")
    ratio("train_stream", "train_stream_nocrc", "augmented training, checksums on / off")


if __name__ == "__main__":
    sys.exit(main())
