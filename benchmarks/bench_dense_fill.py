#!/usr/bin/env python
"""Batch fill of APTLoader on dense (segmentation) data: images with masks, the mmseg recipe.

    python benchmarks/bench_dense_fill.py [--workers 2] [--epochs 2] [--shared ../shared/data] [--quick]

Fill = real tokens of a batch (prefix tokens included) / ``max_tokens``, as in `benchmarks/bench_fill.py`
(whose `epoch_fills` this uses; `dense_row` is the dense row it can print). Streamed packing of
segmentation samples: every batch carries its images' masks. Cases:

- `tests/data/images` (32 photos) with masks made from their colour ranges, crop 128, 700 tokens;
- ``SHARED/camvid`` train (367 images at 480x360, CamVid's void id 11 ignored; research use only,
  read in place, never copied), crop 448, 8,192 tokens; and its val split evaluated (resize keeping
  the aspect to short side 448, no crop), when present.

Augmented training = mmseg's ADE20K pipeline (`ImageTransform` with ``resize_scale``: RandomResize
ratio 0.5-2.0 keeping aspect, RandomCrop with cat_max_ratio 0.75, flip, PhotoMetricDistortion,
padding with the mean colour / 255).
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from apt_data import APTConfig, warmup
from apt_data.loader import APTLoader
from apt_data.masks import MaskLabels, encode_mask
from apt_data.sources import MaskFolderSource
from apt_data.transforms import segmentation_transform
from bench_common import ROOT
from bench_fill import epoch_fills, pct, per_epoch


def dense_row(name: str, source: MaskFolderSource, *, crop: int, max_tokens: int, train: bool, workers: int,
              epochs: int, cfg: APTConfig | None = None) -> str:
    """One table row: the streamed fill of ``source``'s augmented (or eval) batches, masks checked."""
    cfg = cfg or APTConfig()
    loader = APTLoader(source, cfg, packing="stream", max_tokens=max_tokens, num_workers=workers, seed=0,
                       train=train, transform=segmentation_transform(crop, train, cfg.patch_size), pin_memory=False)
    eps = epoch_fills(loader, epochs)
    fills = [f for ep in eps for f in ep.fills]
    kept = [f for ep in eps for f in ep.without_partials()]
    seen = Counter(k for ep in eps for k in ep.keys)
    carried = per_epoch(ep.carried for ep in eps) if train else "-"
    secs = np.mean([ep.seconds for ep in eps])
    return (f"| {name} | {len(source)} | {per_epoch(ep.images for ep in eps)} | {per_epoch(len(ep.fills) for ep in eps)} "
            f"| **{pct(fills)}** | **{pct(kept)}** | {carried} | {len(seen)}/{len(source)} samples seen; "
            f"{secs:.1f} s/epoch |")


def photo_masks(dest: Path) -> MaskFolderSource:
    """`tests/data/images` with masks from their colour ranges (each channel above or below 110)."""
    from PIL import Image

    (dest / "images").mkdir(parents=True)
    (dest / "masks").mkdir()
    for p in sorted((ROOT / "tests" / "data" / "images").glob("*.JPEG")):
        rgb = np.asarray(Image.open(p).convert("RGB"))
        cls = (rgb[..., 0] > 110) * 1 + (rgb[..., 1] > 110) * 2 + (rgb[..., 2] > 110) * 4
        (dest / "images" / p.name).symlink_to(p)
        (dest / "masks" / f"{p.stem}.png").write_bytes(encode_mask(cls.astype(np.uint8)))
    return MaskFolderSource(dest / "images", dest / "masks")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"), help="folder holding camvid/ (optional)")
    ap.add_argument("--quick", action="store_true", help="the repository's photos only")
    args = ap.parse_args(argv)
    print("# command: " + " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]))
    warmup()
    common = dict(workers=args.workers, epochs=args.epochs)
    print(f"# APTLoader fill on segmentation data, streamed packing, {args.workers} workers, {args.epochs} epochs "
          "per case, seed 0; fill = real tokens (prefix included) / max_tokens; augmented = mmseg's ADE20K recipe "
          "(RandomResize 0.5-2.0, RandomCrop cat_max_ratio 0.75, flip, PhotoMetricDistortion, padding)")
    print("| case | samples | images/epoch | batches/epoch | fill, all batches | fill, without <= 1 partial per "
          "worker | carried over/epoch | notes |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench_dense_fill_") as tmp:
        src = photo_masks(Path(tmp) / "photos")
        print(dense_row("`tests/data/images` + colour-range masks, crop 128, 700 tokens, augmented", src, crop=128,
                        max_tokens=700, train=True, **common), flush=True)
    camvid = Path(args.shared) / "camvid"
    if camvid.is_dir() and not args.quick:
        void = MaskLabels(void=(11,))
        train = MaskFolderSource.from_layout(camvid, "train", mask_labels=void)
        print(dense_row("CamVid train, crop 448, 8,192 tokens, augmented", train, crop=448, max_tokens=8192,
                        train=True, **common), flush=True)
        val = MaskFolderSource.from_layout(camvid, "val", mask_labels=void)
        print(dense_row("CamVid val, eval (short side 448, no crop), 8,192 tokens", val, crop=448, max_tokens=8192,
                        train=False, **common), flush=True)
    elif not args.quick:
        print(f"# note: {camvid} is absent: CamVid rows skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
