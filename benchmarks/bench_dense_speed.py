"""Benchmark: segmentation speed of APT and of lower resolution against the full grid, same images, same run.

    python benchmarks/bench_dense_speed.py [--model vit_small_patch14_dinov2] [--size 448x336] [--head conv]
        [--pairs 5.5,4.0 6.5,5.0] [--batch 4] [--iters 5] [--device cpu]

The speed column of the dense study (docs/results/dense/README.md), measured where it can be trusted: the arms
alternate inside every timing iteration (`bench_model.timed`), so a change in background load hits them alike.
For each APT threshold pair: APT entropy, and lower resolution at the grid of the image's aspect closest to APT's
mean token count (`apt_train.segmentation.lowres_grid`, the study's rule). Per arm: patch tokens per image,
inference and train-step (forward + backward + AdamW step, cross-entropy on the upsampled logits) images/s, the
speed-up over the full grid and the one the encoder FLOPs predict (`apt_train.flops`, APT's detail path counted).
Images: the shipped photos (tests/data/images) resized to ``--size``; random weights (speed does not depend on them).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import timm
import torch
from PIL import Image

from apt_data import APTConfig, decode_image, pack_images, warmup
from apt_model import SegmentationModel, create_seg_head, from_timm
from apt_train.flops import vit_flops
from apt_train.segmentation import lowres_grid
from bench_common import ROOT
from bench_model import timed


def parse_size(s: str) -> tuple[int, int]:
    w, h = s.lower().split("x")
    return int(w), int(h)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_small_patch14_dinov2")
    ap.add_argument("--size", type=parse_size, default=(448, 336), help="WxH, multiples of the patch size")
    ap.add_argument("--head", default="conv", choices=["linear", "conv"])
    ap.add_argument("--pairs", nargs="+", default=["5.5,4.0", "6.5,5.0"], help="APT entropy thresholds (2x, 4x)")
    ap.add_argument("--classes", type=int, default=11)
    ap.add_argument("--batch", type=int, default=4, help="images per step")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    warmup()
    dev = torch.device(args.device)
    (w, h), n = args.size, args.batch
    torch.manual_seed(0)
    apt = from_timm(timm.create_model(args.model, pretrained=False, img_size=224, num_classes=0))  # any size
    p = apt.patch_size
    model = SegmentationModel(apt, create_seg_head(args.head, apt.num_features, args.classes)).to(dev)
    paths = sorted((ROOT / "tests" / "data" / "images").glob("*.JPEG"))
    imgs = [np.asarray(Image.fromarray(decode_image(paths[i % len(paths)], h, multiple=p)).resize((w, h)))
            for i in range(n)]
    full_cfg = APTConfig(patch_size=p, num_scales=3, thresholds=(-np.inf, -np.inf))
    arms = [("full grid", pack_images(imgs, full_cfg, num_prefix_tokens=apt.num_prefix_tokens))]
    for pair in args.pairs:
        th = tuple(float(v) for v in pair.split(","))
        cfg = APTConfig(patch_size=p, num_scales=3, thresholds=th)
        b = pack_images(imgs, cfg, num_prefix_tokens=apt.num_prefix_tokens)
        rows, cols = lowres_grid((b.num_real_tokens - n * apt.num_prefix_tokens) / n, (h // p, w // p))
        small = [np.asarray(Image.fromarray(im).resize((cols * p, rows * p), Image.BICUBIC)) for im in imgs]
        low = pack_images(small, full_cfg, num_prefix_tokens=apt.num_prefix_tokens)
        arms += [(f"APT entropy {pair}", b), (f"lower resolution {cols * p}x{rows * p}", low)]
    arms = [(name, b.to(dev)) for name, b in arms]
    target = torch.randint(0, args.classes, (n, h, w), device=dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def infer(b):
        def run():
            with torch.no_grad():
                model(b, [(h, w)] * n)
        return run

    def step(b):
        def run():
            loss = torch.nn.functional.cross_entropy(model(b, [(h, w)] * n), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    model.eval()
    t_inf = timed([infer(b) for _, b in arms], args.iters)
    model.train()
    t_train = timed([step(b) for _, b in arms], args.iters)
    ref_flops = vit_flops(arms[0][1], apt)
    print(f"# bench_dense_speed: {args.model} + {args.head} head at {w}x{h}, {n} real photos per step, device {dev} "
          f"({torch.get_num_threads()} CPU threads), median of {args.iters} alternating timings")
    print("| arm | patch tokens/img | infer img/s | vs full grid | train img/s | vs full grid | FLOP speed-up |")
    print("|---|---|---|---|---|---|---|")
    for (name, b), ti, tt in zip(arms, t_inf, t_train):
        tokens = (b.num_real_tokens - n * apt.num_prefix_tokens) / n
        print(f"| {name} | {tokens:.0f} | {n / ti:.2f} | {t_inf[0] / ti:.2f}x | {n / tt:.2f} | "
              f"{t_train[0] / tt:.2f}x | {ref_flops / vit_flops(b, apt):.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
