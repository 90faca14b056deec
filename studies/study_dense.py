#!/usr/bin/env python
"""Dense evidence study (issue 23): semantic segmentation on CamVid with a DINOv2 ViT-S/14, APT against the
full grid, lower resolution and random dropping at equal tokens; frozen (linear head) and fine-tuned.

    python studies/study_dense.py [--data ../shared/data/camvid] [--weights ../shared/models/...]
        [--sizes 448x336 476x364 896x672] [--grid 4.5,3.0 5.5,4.0 6.0,4.5 6.5,5.0 7.0,5.5]
        [--ft-grid 5.5,4.0 6.5,5.0] [--epochs 1] [--head linear|conv] [--stages frozen finetune report] [--device cpu]
        [--output docs/results/dense] [--cache out/study_dense] [--quick]

Stages (each cached under ``--cache``, so a rerun skips what is done; ``report`` only reads the cache):

- ``frozen`` (per size WxH): the model is `from_timm` of the weights (APT at init = resize-only) with a head
  (``--head``: ``linear``, `LinearSegHead`, BatchNorm + 1x1 conv, DINOv2's linear protocol; ``conv``,
  `ConvSegHead`, a light decoder with two 3x3 convs) fitted on the frozen full-grid features of the train split (AdamW, logits upsampled bilinearly to the half-size mask, cross-entropy ignoring void).
  Then on val, logits upsampled to the native 480x360 mask: the full grid; per threshold pair of ``--grid``
  APT entropy, APT laplacian and upsample (thresholds calibrated to entropy's token fraction), random drop
  (APT's count per image, dropped cells filled from their nearest kept token) and lower resolution (the
  image resized to the grid of APT's aspect closest to its mean token count).
- ``finetune`` (first size only): backbone and head trained from the frozen stage's start by one recipe
  (AdamW, layer decay, warmup + cosine, horizontal flip + random scale crop, the crops identical across
  arms): the full-grid control, APT entropy at each ``--ft-grid`` pair (layouts of the augmented crops) and
  lower resolution at the frozen stage's matched grid for that pair. APT's detail path (zero at init)
  trains at the full lr. Then evaluated on val as above, with train and inference images/s.
- ``report``: the Markdown table, the plot of mIoU against tokens, the overlays and the JSON, over every head
  with results in the cache (rows and plot panels labelled by head; comparisons only within a head).

The cache names carry the head (``frozen-448x336.json`` for linear, ``frozen-448x336-conv.json`` for conv; the
same for the fitted heads and the fine-tune arms), so the results of two heads never mix.

Every mIoU comes with a bootstrap SE over val images and a paired bootstrap SE of its difference to the
control (full grid of the same stage) and, for APT, to lower resolution at the same threshold.
``--quick``: 2 train and 2 val images, 448x336, one pair, 1 fine-tune step (the test).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from apt_data import APTConfig, patchify
from apt_data.calibrate import calibrate
from apt_train.evaluation import random_base_layout
from apt_train.segmentation import SegmentationTask, lowres_grid

import dense_parts as dp
import dense_report as dr
from apt_model.heads import SEG_HEADS
from study_parts import DEFAULT_WEIGHTS, NEG, PATCH, ROOT, SCORER_BASE, log, parse_pair, scored, write_text

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "camvid"
GRID = [(4.5, 3.0), (5.5, 4.0), (6.0, 4.5), (6.5, 5.0), (7.0, 5.5)]


def parse_size(s: str) -> tuple[int, int]:
    w, h = (int(v) for v in s.lower().split("x"))
    if w % PATCH or h % PATCH:
        raise argparse.ArgumentTypeError(f"{s}: both sides must be multiples of {PATCH} px")
    return w, h


def frozen_stage(args, data, weights, size, cache: Path) -> list[dict]:
    """Every frozen row at ``size`` with ``args.head`` (cached in ``cache/frozen-WxH[-head].json`` with the fitted
    head)."""
    tag = f"{size[0]}x{size[1]}"
    out = cache / f"frozen-{dp.cache_tag(size, args.head)}.json"
    if out.is_file():
        log(f"frozen {tag}: read back from {out}")
        return json.loads(out.read_text())["rows"]
    t0 = time.perf_counter()
    model = dp.build_model(weights, args.device, args.head)
    head_path = cache / f"head-{dp.cache_tag(size, args.head)}.pt"
    n_head = args.head_train if size[0] <= 480 else args.hires_head_train
    model.head.load_state_dict(dp.fit_head(model, data["train"], size, args, head_path, n_head))
    val = data["val"]
    imgs = [dp.resize_image(im, size) for im in val["images"]]
    masks = val["masks"]
    task = SegmentationTask(num_classes=dp.NUM_CLASSES, ignore_index=dp.IGNORE, class_names=list(dp.CLASSES))
    uni = APTConfig(patch_size=PATCH, num_scales=3, thresholds=NEG)
    rows = [dp.eval_row(model, task, imgs, masks, uni, None, args, stage="frozen", method="full grid",
                        setting=f"{tag}", size=size)]
    grid_hw = (size[1] // PATCH, size[0] // PATCH)
    scores = {s: scored(imgs, s) for s in args.scorers}
    for th in args.grid:
        cfg = APTConfig(patch_size=PATCH, num_scales=3, thresholds=th)
        lays = [patchify(im, cfg) for im in imgs]
        st = f"({th[0]:g}, {th[1]:g})"
        apt = dp.eval_row(model, task, imgs, masks, cfg, lays, args, stage="frozen", method="APT entropy",
                          setting=st, size=size, pair=th)
        rows.append(apt)
        for s in args.scorers:
            c = calibrate(scores[s], APTConfig(patch_size=PATCH, num_scales=3, thresholds=SCORER_BASE[s], scorer=s),
                          apt["fraction"], SCORER_BASE[s])
            cs = APTConfig(patch_size=PATCH, num_scales=3, thresholds=c.thresholds, scorer=s)
            rows.append(dp.eval_row(model, task, imgs, masks, cs, None, args, stage="frozen", method=f"APT {s}",
                                    setting=f"({c.thresholds[0]:.3g}, {c.thresholds[1]:.3g}) ~ {st}", size=size,
                                    pair=th))
        if not args.no_random:
            rnd = [random_base_layout(im.shape[:2], cfg, len(lay), np.random.default_rng([args.seed, k]))
                   for k, (im, lay) in enumerate(zip(imgs, lays))]
            rows.append(dp.eval_row(model, task, imgs, masks, cfg, rnd, args, stage="frozen", method="random drop",
                                    setting=f"APT {st}'s count", size=size, pair=th, fill=True))
        rows.append(dp.lowres_row(model, task, val["images"], masks, apt["tokens_per_image"], grid_hw, args,
                                  stage="frozen", size=size, pair=th))
    dp.add_paired(rows, args.bootstrap)
    for r in rows:
        log(dr.fmt_row(r))
    write_text(out, json.dumps(dict(rows=rows, seconds=time.perf_counter() - t0)))
    return rows


def finetune_stage(args, data, weights, size, cache: Path) -> list[dict]:
    """Fine-tune arms at ``size``: control, APT per ``--ft-grid`` pair, lower resolution at the grid closest to
    that pair's mean APT token count on val (the frozen stage's lower-resolution match, from the layouts alone)."""
    head = cache / f"head-{dp.cache_tag(size, args.head)}.pt"
    if not head.is_file():
        model = dp.build_model(weights, args.device, args.head)
        n_head = args.head_train if size[0] <= 480 else args.hires_head_train
        dp.fit_head(model, data["train"], size, args, head, n_head)
    grid_hw = (size[1] // PATCH, size[0] // PATCH)
    imgs = [dp.resize_image(im, size) for im in data["val"]["images"]]
    arms = [("full grid", None, None)]
    for th in args.ft_grid:
        cfg = APTConfig(patch_size=PATCH, num_scales=3, thresholds=th)
        tokens = float(np.mean([len(patchify(im, cfg)) for im in imgs]))
        arms += [("APT entropy", th, None), ("lower resolution", th, lowres_grid(tokens, grid_hw))]
    rows = [dp.finetune_arm(weights, head, data, size, method, th, low, args, cache) for method, th, low in arms]
    dp.add_paired(rows, args.bootstrap)
    for r in rows:
        log(dr.fmt_row(r))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="ADE20K layout: images/{train,val}, annotations/...")
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--output", default=str(ROOT / "docs" / "results" / "dense"))
    ap.add_argument("--cache", default=str(ROOT / "out" / "study_dense"))
    ap.add_argument("--sizes", nargs="+", type=parse_size, default=[(448, 336), (476, 364), (896, 672)])
    ap.add_argument("--grid", nargs="+", type=parse_pair, default=GRID)
    ap.add_argument("--ft-grid", nargs="+", type=parse_pair, default=[(5.5, 4.0), (6.5, 5.0)])
    ap.add_argument("--scorers", nargs="*", default=["laplacian", "upsample"])
    ap.add_argument("--head", choices=list(SEG_HEADS), default="linear",
                    help="the segmentation head: linear (BatchNorm + 1x1 conv) or conv (a light decoder)")
    ap.add_argument("--no-random", action="store_true")
    ap.add_argument("--stages", nargs="+", default=["frozen", "finetune", "report"],
                    choices=["frozen", "finetune", "report"])
    ap.add_argument("--head-train", type=int, default=0, help="train images for the head (0: all)")
    ap.add_argument("--hires-head-train", type=int, default=96, help="train images for the head above 480 px")
    ap.add_argument("--head-epochs", type=int, default=30)
    ap.add_argument("--epochs", type=float, default=1.0, help="fine-tune epochs (fractions: a prefix of one)")
    ap.add_argument("--ft-steps", type=int, default=0, help="fine-tune steps (overrides --epochs)")
    ap.add_argument("--ft-train", type=int, default=0, help="train images for the fine-tunes (0: all)")
    ap.add_argument("--batch", type=int, default=4, help="fine-tune images per step")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--layer-decay", type=float, default=0.75)
    ap.add_argument("--eval-batch", type=int, default=4)
    ap.add_argument("--val", type=int, default=0, help="val images (0: all)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--overlays", type=int, default=2, help="val images in the overlay picture")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (the full recipe on a GPU; untested here)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="2 train / 2 val images, 448x336, one pair, 1 step")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.grid, args.ft_grid = [(448, 336)], [(6.5, 5.0)], [(6.5, 5.0)]
        args.head_train = args.hires_head_train = args.val = 2
        args.head_epochs, args.ft_steps, args.batch, args.bootstrap, args.overlays = 2, 1, 2, 20, 1
    data_dir, weights = Path(args.data), Path(args.weights)
    if not weights.is_file():
        ap.error(f"weights {weights} not found")
    if not (data_dir / "images" / "val").is_dir():
        ap.error(f"{data_dir}: no images/val folder (the ADE20K layout)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cache, out = Path(args.cache), Path(args.output)
    cache.mkdir(parents=True, exist_ok=True)
    command = "python studies/study_dense.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    data = dp.load_camvid(data_dir, args)
    log(f"study_dense: {len(data['train']['images'])} train / {len(data['val']['images'])} val images from "
        f"{data_dir}; sizes {args.sizes}; grid {args.grid}; {args.head} head; stages {args.stages}; "
        f"{torch.get_num_threads()} threads")
    rows = []
    first = args.sizes[0]
    if "frozen" in args.stages:
        rows += [r for size in args.sizes for r in frozen_stage(args, data, weights, size, cache)]
    if "finetune" in args.stages:
        rows += finetune_stage(args, data, weights, first, cache)
    if "report" in args.stages:
        dr.write_report(out, cached_rows(args, cache, rows), args, command, data, weights, cache)
    return 0


def cached_rows(args, cache: Path, rows: list[dict]) -> list[dict]:
    """``rows`` (this run's) and every cached row of the sizes and heads it has not computed, each head's frozen
    rows before its fine-tunes, the run's head first; fine-tunes paired within their head."""
    done = {(r["stage"], r["size"], dp.head_of(r)) for r in rows}
    heads = [args.head] + [h for h in SEG_HEADS if h != args.head]
    out = []
    for head in heads:
        for size in args.sizes:
            tag, f = f"{size[0]}x{size[1]}", cache / f"frozen-{dp.cache_tag(size, head)}.json"
            own = [r for r in rows if r["stage"] == "frozen" and r["size"] == tag and dp.head_of(r) == head]
            out += own or (json.loads(f.read_text())["rows"] if f.is_file() else [])
        first = args.sizes[0]
        if ("fine-tuned", f"{first[0]}x{first[1]}", head) in done:
            out += [r for r in rows if r["stage"] == "fine-tuned" and dp.head_of(r) == head]
        else:
            ft = dp.cached_finetunes(cache, first, head)
            dp.add_paired(ft, args.bootstrap)
            out += ft
    return out


if __name__ == "__main__":
    sys.exit(main())
