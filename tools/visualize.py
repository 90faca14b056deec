#!/usr/bin/env python
"""Draw APT patch layouts over images and write them as PNGs.

    python tools/visualize.py IMAGE [IMAGE ...] --out DIR [--size 384] [--thresholds 5.5 4.0]

Prints, per image, the tokens APT uses against the uniform grid of a plain ViT.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from apt_data import APTConfig, decode_image, patchify  # noqa: E402
from apt_data.visualize import draw_layout  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="+", help="image files")
    ap.add_argument("--out", required=True, help="output folder for the PNGs")
    ap.add_argument("--size", type=int, default=384, help="short side in pixels (aspect kept, rounded to the patch size)")
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--num-scales", type=int, default=3)
    ap.add_argument("--thresholds", type=float, nargs="*", default=[5.5, 4.0])
    ap.add_argument("--scorer", default="entropy")
    args = ap.parse_args(argv)
    try:
        cfg = APTConfig(args.patch_size, args.num_scales, tuple(args.thresholds), args.scorer)
    except ValueError as e:
        ap.error(str(e))
    os.makedirs(args.out, exist_ok=True)
    total = uniform = 0
    for path in args.images:
        try:
            img = decode_image(path, args.size, crop=False, multiple=cfg.patch_size)
        except ValueError as e:
            print(f"skip: {e}", file=sys.stderr)
            continue
        layout = patchify(img, cfg)
        out = Path(args.out) / (Path(path).stem + ".layout.png")
        tmp = out.with_suffix(".tmp.png")
        Image.fromarray(draw_layout(img, layout)).save(tmp)
        os.replace(tmp, out)
        counts = layout.counts()
        total += len(layout)
        uniform += layout.uniform_tokens
        print(f"{Path(path).name}: {img.shape[1]}x{img.shape[0]}  tokens {len(layout)} / {layout.uniform_tokens} "
              f"({len(layout) / layout.uniform_tokens:.1%})  per scale {counts.tolist()}  -> {out}")
    if uniform:
        print(f"total: {total} / {uniform} tokens ({total / uniform:.1%} of the uniform grid)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
