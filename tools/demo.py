#!/usr/bin/env python
"""The default job until the trainer lands: patchify the embedded sample images with APT.

    python tools/demo.py [--images DIR] [--size 384] [--out out/]

Prints the tokens APT keeps per image against the uniform ViT grid (per scale), the average
saving, and writes a mosaic of layouts to ``OUT/layouts.png``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from apt_data import APTConfig, decode_image, patchify, warmup  # noqa: E402
from apt_data.visualize import draw_layout  # noqa: E402

DEFAULT_IMAGES = ROOT / "tests" / "data" / "images"


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
    ap.add_argument("--images", default=str(DEFAULT_IMAGES), help="folder of images (default: the shipped samples)")
    ap.add_argument("--size", type=int, default=384, help="images are resized and centre-cropped to SIZE x SIZE")
    ap.add_argument("--thresholds", type=float, nargs="*", default=[5.5, 4.0])
    ap.add_argument("--out", default="out", help="folder for layouts.png")
    ap.add_argument("--mosaic", type=int, default=8, help="layouts drawn in the mosaic")
    args = ap.parse_args(argv)
    cfg = APTConfig(thresholds=tuple(args.thresholds))
    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        ap.error(f"no images in {args.images}")
    warmup()
    print(f"APT demo: {len(paths)} images from {args.images} at {args.size}x{args.size}, {cfg}")
    print(f"{'image':44s} {'tokens':>7s} {'uniform':>7s} {'kept':>6s}  per scale (16/32/64 px)")
    tiles, kept, uniform, t_apt = [], 0, 0, 0.0
    for path in paths:
        img = decode_image(path, args.size)
        t0 = time.perf_counter()
        layout = patchify(img, cfg)
        t_apt += time.perf_counter() - t0
        kept += len(layout)
        uniform += layout.uniform_tokens
        print(f"{path.name[:44]:44s} {len(layout):7d} {layout.uniform_tokens:7d} {len(layout) / layout.uniform_tokens:6.1%}  "
              f"{'/'.join(map(str, layout.counts().tolist()))}")
        if len(tiles) < args.mosaic:
            tiles.append(np.asarray(Image.fromarray(draw_layout(img, layout)).resize((256, 256), Image.BILINEAR)))
    os.makedirs(args.out, exist_ok=True)
    out = Path(args.out) / "layouts.png"
    tmp = out.with_suffix(".tmp.png")
    Image.fromarray(mosaic(tiles)).save(tmp)
    os.replace(tmp, out)
    print(f"total: {kept} / {uniform} tokens = {kept / uniform:.1%} of the uniform grid "
          f"({uniform / kept:.2f}x fewer tokens); scoring+selection {t_apt / len(paths) * 1e6:.0f} us/image")
    print(f"layouts: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
