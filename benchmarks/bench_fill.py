#!/usr/bin/env python
"""Batch fill of APTLoader: streaming packing (real token counts) against planning from upper bounds.

    python benchmarks/bench_fill.py [--workers 2] [--epochs 2] [--shared ../shared/data]

Fill = real tokens of a batch (prefix tokens included) / ``max_tokens``. For each case the loader
runs ``--epochs`` epochs with ``--workers`` workers and this prints one table row: images and
batches per epoch, the mean fill over every batch, the same without at most one partial batch per
worker and epoch (its last batch: a stream's flushed batch at the end of an evaluation pass, a
plan's leftover bins), the samples carried over into the next epoch (streamed training), and, for
comparison, the fill of the same epochs planned from uniform-grid upper bounds (``packing="plan"``
without exact counts: an augmented batch then holds only the tokens APT keeps of the bound).

Cases (augmented training = the ``full``/``sample`` recipes' transform, built by
`apt_train.build.train_transform`: RandomResizedCrop + flip + RandAugment ``rand-m9-mstd0.5-inc1``
+ random erasing 0.25):

- the sample ``shards/``, 224 px, 4,096 tokens, augmented training; the same with the ``full`` recipe's
  Mixup 0.8 / CutMix 1.0 (`apt_data.mixing`: every image mixed with a partner before patchify);
- shards built here from ``SHARED/imagenet-sample-200`` (200 photos at their own sizes) at 384 px,
  8,192 tokens, augmented training (skipped with a note without ``SHARED``);
- an image folder (no shards), 224 px, augmented training: 1,000 photos of
  ``SHARED/imagenette-224-train`` (100 per class) when present, else ``tests/data/images`` (32
  photos, at 700 tokens so an epoch has several batches); and ``SHARED/imagenet-sample-200`` as a
  folder (full-size photos), 224 px, 4,096 tokens, when present;
- evaluation (``train=False``) of ``shards/:val`` at thresholds (6.0, 4.5), not the index's: layouts
  from the stored score maps, streamed (every sample once per epoch).

`benchmarks/bench_loader.py` imports `augmented_transform` and `epoch_fills` from here.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import numpy as np

from apt_data import APTConfig, warmup
from apt_data.loader import APTLoader
from apt_data.loader.stream import partition
from apt_data.transforms import ImageTransform
from bench_common import ROOT

IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def augmented_transform(image_size: int, patch_size: int = 16, mean=(0.5, 0.5, 0.5)) -> ImageTransform:
    """The augmented training transform the trainer builds (`apt_train.build.train_transform` with the
    ``full`` recipe's RandAugment and random erasing) for a model of ``patch_size`` and pixel ``mean``
    (the default ``vit_tiny_patch16_224``'s: erasing fills with grey 128)."""
    import torch

    from apt_train.build import train_transform
    from apt_train.recipes import RECIPES

    recipe = RECIPES["full"]
    model = SimpleNamespace(patch_size=patch_size,
                            patch_embed=SimpleNamespace(pixel_mean=torch.tensor(mean).view(1, 3, 1) * 255))
    return train_transform(model, image_size, augment=recipe["augment"], auto_augment=recipe["auto_augment"],
                           re_prob=recipe["re_prob"])


@dataclass
class EpochFill:
    """One epoch of a loader: fill and worker role of every batch, its keys, the samples carried over."""

    fills: list = field(default_factory=list)
    roles: list = field(default_factory=list)
    keys: list = field(default_factory=list)
    carried: Optional[int] = None
    seconds: float = 0.0

    @property
    def images(self) -> int:
        return len(self.keys)

    def without_partials(self) -> list:
        """Fills without each worker's last batch of the epoch, when it has more than one: at most
        one partial batch per worker (a stream's evaluation pass flushes its open batches fullest
        first; a plan's leftover bins close at its end)."""
        last = {r: k for k, r in enumerate(self.roles)}
        count = Counter(self.roles)
        drop = {k for r, k in last.items() if count[r] > 1}
        return [f for k, f in enumerate(self.fills) if k not in drop]


def role_finder(loader: APTLoader) -> Callable[[int, tuple], int]:
    """``(batch number in the epoch, keys) -> worker role`` of the batches of a fresh epoch: a plan
    deals bins round-robin; a stream's worker owns its partition of the samples."""
    if loader.strategy.name != "stream":
        return lambda k, keys: k % max(1, loader.num_workers)
    W, n = max(1, loader.num_workers), len(loader.source)
    owner = np.empty(n, np.int64)
    for role in range(W):
        owner[partition(n, loader.seed, loader.rank, loader.world_size, role, W, loader.shuffle)] = role
    index = {k: i for i, k in enumerate(loader.source.keys)}
    return lambda k, keys: int(owner[index[keys[0]]])


def epoch_fills(loader: APTLoader, epochs: int, first: int = 0) -> list[EpochFill]:
    """Run epochs ``first ..`` of ``loader``; check no sample comes twice in an epoch."""
    role_of = role_finder(loader)
    out = []
    for e in range(first, first + epochs):
        loader.set_epoch(e)
        ep, t0 = EpochFill(), time.perf_counter()
        for k, (batch, _) in enumerate(loader):
            ep.fills.append(batch.num_real_tokens / loader.max_tokens)
            ep.roles.append(role_of(k, batch.keys))
            ep.keys.extend(batch.keys)
        ep.seconds = time.perf_counter() - t0
        ep.carried = loader.stats.carried_over.get(e)
        dup = [k for k, c in Counter(ep.keys).items() if c > 1]
        if dup:
            print(f"!! epoch {e}: {len(dup)} samples twice, e.g. {dup[:3]}")
        out.append(ep)
    return out


def pct(v) -> str:
    return f"{100 * float(np.mean(v)):.2f}%" if len(v) else "-"


def per_epoch(values) -> str:
    values = list(values)
    return str(values[0]) if len(set(values)) == 1 else "/".join(map(str, values))


def row(name: str, source, *, image_size: int, max_tokens: int, train: bool, workers: int, epochs: int,
        cfg: Optional[APTConfig] = None, mix=None) -> str:
    cfg = cfg or APTConfig()
    tr = augmented_transform(image_size, cfg.patch_size) if train else ImageTransform(size=image_size,
                                                                                     multiple=cfg.patch_size)
    kw = dict(max_tokens=max_tokens, num_workers=workers, seed=0, train=train, transform=tr, pin_memory=False,
              mix=mix)
    stream = APTLoader(source, cfg, packing="stream", **kw)
    plan = APTLoader(source, cfg, packing="plan", **kw)
    assert not plan.exact_counts, "the comparison is planning from upper bounds"
    eps = epoch_fills(stream, epochs)
    planned = epoch_fills(plan, epochs)
    n = len(stream.source)
    fills = [f for ep in eps for f in ep.fills]
    kept = [f for ep in eps for f in ep.without_partials()]
    seen = Counter(k for ep in eps for k in ep.keys)
    if train:
        carried = per_epoch(ep.carried for ep in eps)
        note = f"{len(seen)}/{n} samples seen, at most {max(seen.values())}x"
    else:
        carried = "-"
        once = all(sorted(ep.keys) == sorted(stream.source.keys) for ep in eps)
        note = "every sample once per epoch" if once else "!! NOT every sample once per epoch"
        if stream._scores:
            note += ", layouts from the stored score maps"
    p_fills = [f for ep in planned for f in ep.fills]
    p_kept = [f for ep in planned for f in ep.without_partials()]
    secs = np.mean([ep.seconds for ep in eps])
    return (f"| {name} | {n} | {per_epoch(ep.images for ep in eps)} | {per_epoch(len(ep.fills) for ep in eps)} | "
            f"**{pct(fills)}** | **{pct(kept)}** | {carried} | {pct(p_fills)} / {pct(p_kept)} "
            f"({per_epoch(len(ep.fills) for ep in planned)} batches) | {note}; {secs:.1f} s/epoch |")


def imagenet_sample_list(src: Path, classes_tsv: Path, dest: Path) -> Path:
    """A TSV list (path, ImageNet-1k label, wnid) of the flat ``<wnid>_<name>.JPEG`` folder ``src``."""
    table = {}
    if classes_tsv.is_file():
        for line in classes_tsv.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 2 and parts[0].strip().isdigit():
                table[parts[1].strip()] = int(parts[0])
    files = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    wnids = sorted({p.name.split("_")[0] for p in files})
    lines = [f"{p.resolve()}\t{table.get(w, wnids.index(w))}\t{w}" for p in files for w in [p.name.split("_")[0]]]
    dest.write_text("\n".join(lines) + "\n")
    return dest


def link_folder(files: list[Path], dest: Path, class_of: Callable[[Path], str]) -> Path:
    """An ImageNet-layout folder of symlinks to ``files`` (class folder from ``class_of``)."""
    for p in files:
        d = dest / class_of(p)
        d.mkdir(parents=True, exist_ok=True)
        (d / p.name).symlink_to(p.resolve())
    return dest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"),
                    help="folder holding imagenet-sample-200/ and imagenette-224-train/ (optional)")
    ap.add_argument("--folder-files", type=int, default=1000, help="photos of imagenette-224-train in the folder case")
    ap.add_argument("--quick", action="store_true", help="the sample shards and tests/data/images only (a smoke run)")
    args = ap.parse_args(argv)

    print("# command: " + " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]))
    warmup()
    shared = Path(args.shared)
    common = dict(workers=args.workers, epochs=args.epochs)
    print(f"# APTLoader fill, {args.workers} workers, {args.epochs} epochs per case, seed 0; fill = real tokens "
          "(prefix included) / max_tokens; augmented training = RandomResizedCrop + flip + RandAugment "
          "rand-m9-mstd0.5-inc1 + random erasing 0.25 (apt_train.build.train_transform)")
    print("| case | samples | images/epoch | batches/epoch | stream fill, all batches | stream fill, without <= 1 "
          "partial per worker | carried over/epoch | plan (upper bounds) fill: all / without partials | notes |")
    print("|---|---|---|---|---|---|---|---|---|")
    notes = []
    with tempfile.TemporaryDirectory(prefix="bench_fill_") as tmp:
        tmp = Path(tmp)
        print(row("sample `shards/`, 224 px, 4,096 tokens, augmented training", str(ROOT / "shards"), image_size=224,
                  max_tokens=4096, train=True, **common), flush=True)
        from apt_data.mixing import MixConfig

        print(row("the same + Mixup 0.8 / CutMix 1.0 (the full recipe; each mixed image decodes a partner)",
                  str(ROOT / "shards"), image_size=224, max_tokens=4096, train=True,
                  mix=MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=10), **common), flush=True)

        sample200 = shared / "imagenet-sample-200"
        if args.quick:
            pass
        elif sample200.is_dir():
            from apt_data.shards.build import build_shards

            t0 = time.perf_counter()
            lst = imagenet_sample_list(sample200, shared / "imagenet-classes.tsv", tmp / "sample200.tsv")
            res = build_shards(lst, tmp / "shards384", image_size=384, workers=args.workers, progress=False)
            notes.append(f"384-px shards of {sample200}: {res.summary()} in {time.perf_counter() - t0:.0f} s")
            print(row("shards of `imagenet-sample-200` at 384 px, 8,192 tokens, augmented training",
                      str(tmp / "shards384"), image_size=384, max_tokens=8192, train=True, **common), flush=True)
        else:
            notes.append(f"skipped the 384-px shards of imagenet-sample-200: {sample200} is absent")

        nette = shared / "imagenette-224-train"
        if nette.is_dir() and not args.quick:
            per_class = max(1, args.folder_files // max(1, sum(1 for d in nette.iterdir() if d.is_dir())))
            files = [p for d in sorted(x for x in nette.iterdir() if x.is_dir())
                     for p in sorted(d.glob("*"))[:per_class] if p.suffix.lower() in IMAGE_EXTS]
            folder = link_folder(files, tmp / "nette", lambda p: p.parent.name)
            print(row(f"folder: {len(files)} photos of `imagenette-224-train`, 224 px, 4,096 tokens, augmented "
                      "training", str(folder), image_size=224, max_tokens=4096, train=True, **common), flush=True)
        else:
            if not args.quick:
                notes.append(f"{nette} is absent: the folder case reads tests/data/images (32 photos) at 700 tokens")
            files = sorted(p for p in (ROOT / "tests/data/images").iterdir() if p.suffix.lower() in IMAGE_EXTS)
            folder = link_folder(files, tmp / "photos", lambda p: f"c{files.index(p) % 4}")
            print(row(f"folder: `tests/data/images` ({len(files)} photos), 224 px, 700 tokens, augmented training",
                      str(folder), image_size=224, max_tokens=700, train=True, **common), flush=True)
        if sample200.is_dir() and not args.quick:
            files = sorted(p for p in sample200.iterdir() if p.suffix.lower() in IMAGE_EXTS)
            folder = link_folder(files, tmp / "sample200", lambda p: p.name.split("_")[0])
            print(row("folder: `imagenet-sample-200` (200 full-size photos), 224 px, 4,096 tokens, augmented "
                      "training", str(folder), image_size=224, max_tokens=4096, train=True, **common), flush=True)

        print(row("eval `shards/:val`, 224 px, 4,096 tokens, thresholds (6.0, 4.5) from the stored score maps",
                  str(ROOT / "shards") + ":val", image_size=224, max_tokens=4096, train=False,
                  cfg=APTConfig(thresholds=(6.0, 4.5)), **common), flush=True)
    for note in notes:
        print(f"# note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
