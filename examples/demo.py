#!/usr/bin/env python
"""The data side alone: `APTLoader` batches of the embedded sample dataset ``shards/``, no model.

    python examples/demo.py [--source shards] [--max-tokens 4096] [--workers 2] [--out out/]

Runs `APTLoader` over the sample shards (token-budget batches planned from the index, built by
worker processes), prints per-batch and total token counts against the uniform ViT grid, and
writes a mosaic of patch layouts to ``OUT/layouts.png``. The main job (training the model on
these batches, with evaluation) is ``tools/train.py``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from apt_data import patchify
from apt_data.loader import APTLoader
from apt_data.visualize import draw_layout
from apt_train.flags import add_loader_args, config_from_args

ROOT = Path(__file__).resolve().parents[1]  # the checkout: its sample shards/


def mosaic(tiles: list[np.ndarray], cols: int = 4, pad: int = 4) -> np.ndarray:
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    rows = -(-len(tiles) // cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        out[y:y + t.shape[0], x:x + t.shape[1]] = t
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(ROOT / "shards"), help="shards, an index, or an image folder")
    ap.add_argument("--out", default="out", help="folder for layouts.png")
    ap.add_argument("--mosaic", type=int, default=8, help="layouts drawn in the mosaic")
    add_loader_args(ap, max_tokens=4096)
    args = ap.parse_args(argv)
    cfg = config_from_args(args, ap)
    loader = APTLoader(args.source, cfg, max_tokens=args.max_tokens, max_images=args.max_images,
                       num_workers=args.workers, image_size=args.image_size or 224,
                       static_shapes=args.static_shapes, shuffle=False, pin_memory=False)
    print(f"APT demo: {len(loader.source)} images from {args.source}, {cfg}")
    print(f"{len(loader)} batches of <= {args.max_tokens} tokens (class token included), planned from "
          f"{'exact index token counts' if loader.exact_counts else 'uniform-grid bounds'}")
    print(f"{'batch':>5s} {'images':>6s} {'tokens':>7s} {'uniform':>7s} {'kept':>6s} {'16/32/64 px tokens':>20s}")
    t0 = time.perf_counter()
    kept = uniform = images = 0
    per_scale = np.zeros(cfg.num_scales, np.int64)
    for k, (batch, labels) in enumerate(loader):
        n_tok = batch.num_real_tokens - batch.num_images * batch.num_prefix_tokens
        n_uni = sum((h // cfg.patch_size) * (w // cfg.patch_size) for h, w in batch.image_sizes)
        counts = [int(p.shape[0]) for p in batch.pixels]
        per_scale += counts
        kept, uniform, images = kept + n_tok, uniform + n_uni, images + batch.num_images
        print(f"{k:5d} {batch.num_images:6d} {n_tok:7d} {n_uni:7d} {n_tok / n_uni:6.1%} {'/'.join(map(str, counts)):>20s}")
    dt = time.perf_counter() - t0
    print(f"total: {images} images, {kept} / {uniform} patch tokens = {kept / uniform:.1%} of the uniform grid "
          f"({uniform / kept:.2f}x fewer); per scale {per_scale.tolist()}; {images / dt:.0f} images/s")
    if loader.stats.num_skipped:
        print(f"skipped {loader.stats.num_skipped} bad samples: {dict(loader.stats.skipped)}")
    tiles = []
    for i in range(min(args.mosaic, len(loader.source))):
        img = loader.transform(loader.source.read(i), loader.source.keys[i])
        tiles.append(np.asarray(Image.fromarray(draw_layout(img, patchify(img, cfg))).resize((224, 224))))
    os.makedirs(args.out, exist_ok=True)
    out = Path(args.out) / "layouts.png"
    tmp = out.with_suffix(".tmp.png")
    Image.fromarray(mosaic(tiles)).save(tmp)
    os.replace(tmp, out)
    print(f"layouts: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
