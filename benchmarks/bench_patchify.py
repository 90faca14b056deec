#!/usr/bin/env python
"""Benchmark: APT scoring + patch selection against JPEG decode + resize, same images, same run.

    python benchmarks/bench_patchify.py [--images DIR] [--sizes 224 384 512 1024] [--repeats 5]

For each size, every real sample image is decoded from its JPEG bytes and resized + centre-cropped
to SIZE x SIZE (`apt_data.decode_image`, what a loader does), then `patchify` runs on the result.
Per-image times are the median of ``--repeats`` runs, averaged over the images; the process is
pinned to one core. The target (issue 2): scoring + selection <= 5% of decode + resize at 384 px.
The ``floor`` columns time, on the same images, the two passes every exact evaluation of the
paper's definition makes (`band_bins`: the float32 gray value and 512-bin index of every pixel; and
that plus one histogram increment per pixel, nothing else): what the entropy column cannot go
below with this design, as a share of decode + resize.
``--full-pyramid`` adds, as an in-run baseline, the entropy selection from every scale's complete
score map (`score_flat` + `select_patches`: the kernel `patchify` used before the lazy one).
It also starts a fresh Python process to show that the kernels load from Numba's on-disk cache
instead of compiling in every worker.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from numba import njit

from apt_data import APTConfig, decode_image, patchify, warmup
from apt_data.layout import layout_from_flat_scores
from apt_data.scoring import score_flat
from apt_data.scoring._gray import as_rows
from apt_data.scoring.entropy import _count_cell, band_bins
from bench_common import ROOT

DEFAULT_IMAGES = ROOT / "tests" / "data" / "images"

_FRESH_PROCESS = r"""
import time, json
import torch  # imported by the packing kernel's module; not part of the kernels' load time
t0 = time.perf_counter()
import apt_data
t1 = time.perf_counter()
apt_data.warmup()
t2 = time.perf_counter()
from apt_data.scoring.entropy import entropy_pyramid
from apt_data.scoring.laplacian import laplacian_pyramid
from apt_data.scoring.upsample import upsample_pyramid
from apt_data.layout import select_patches, _paint_scales
from apt_data.scoring.entropy import _entropy_layout_flat
from apt_data.assemble import extract_tokens
hits = misses = 0
for d in (entropy_pyramid, laplacian_pyramid, upsample_pyramid, select_patches, _paint_scales, _entropy_layout_flat,
          extract_tokens):
    hits += sum(d.stats.cache_hits.values()); misses += sum(d.stats.cache_misses.values())
print(json.dumps({"import_s": t1 - t0, "warmup_s": t2 - t1, "cache_hits": hits, "compiled": misses}))
"""


def fresh_process_warmup() -> dict:
    import json
    out = subprocess.run([sys.executable, "-c", _FRESH_PROCESS], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@njit(nogil=True)
def _floor_passes(rows, channels, p, count):
    """`entropy_layout`'s per-pixel work alone: bins of every pixel of each band of 2p-px patches,
    and (``count``) one increment per pixel into its patch's parity sub-histograms."""
    c1 = 2 * p
    hs1 = rows.shape[0] // c1
    ws1 = rows.shape[1] // channels // c1
    ncols = ws1 * c1
    r = np.empty(ncols, np.uint8)
    g = np.empty(ncols, np.uint8)
    b = np.empty(ncols, np.uint8)
    bins = np.empty((c1, ncols), np.uint16)
    sub = np.zeros(4 * 512, np.uint16)  # as the kernel's (counts wrap on huge images: timing only)
    for i1 in range(hs1):
        band_bins(rows, channels, i1 * c1, c1, ncols, r, g, b, bins)
        if count:
            for j in range(ws1):
                _count_cell(bins, c1, j * c1, c1, sub)
    return sub[0] + bins[0, 0]


def median_time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default=str(DEFAULT_IMAGES))
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 384, 512, 1024])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--limit", type=int, default=0, help="use at most this many images (0: all)")
    ap.add_argument("--scorers", nargs="+", default=["entropy", "laplacian", "upsample"])
    ap.add_argument("--full-pyramid", action="store_true", help="also time entropy from the full score pyramid")
    args = ap.parse_args(argv)

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if args.limit:
        paths = paths[: args.limit]
    blobs = [(p.name, p.read_bytes()) for p in paths]

    fresh = fresh_process_warmup()
    warmup()
    ro = np.zeros((64, 64 * 3), np.uint8)
    ro.flags.writeable = False  # decode_image's arrays are read-only: compile that version before timing
    _floor_passes(ro, 3, 16, True)
    print(f"# bench_patchify: {len(blobs)} real JPEGs from {args.images}, one core, median of {args.repeats}")
    print(f"fresh process: import apt_data {fresh['import_s'] * 1e3:.0f} ms, first call of every kernel "
          f"{fresh['warmup_s'] * 1e3:.0f} ms; kernels loaded from the on-disk cache: {fresh['cache_hits']}, "
          f"compiled: {fresh['compiled']}")
    print()
    extra = ["entropy, full pyramid"] if args.full_pyramid else []
    head = "| size | tokens kept | decode+resize us | " + " | ".join(f"{s} us" for s in args.scorers + extra)
    head += " | entropy / decode+resize | floor: bins us | floor: bins + count us | floor / decode+resize |"
    print(head)
    print("|" + "---|" * (7 + len(args.scorers) + len(extra)))
    full_cfg = APTConfig()

    def full_pyramid(img):
        flat, _, _ = score_flat(img, full_cfg.patch_size, full_cfg.num_scales, "entropy", need_base=False)
        return layout_from_flat_scores(flat, img.shape[:2], full_cfg)

    for size in args.sizes:
        dec, score, kept, floor_bins, floor_count = [], {s: [] for s in args.scorers + extra}, [], [], []
        for name, data in blobs:
            img = decode_image(data, size, name=name)
            dec.append(median_time(lambda: decode_image(data, size, name=name), args.repeats))
            for s in args.scorers:
                cfg = APTConfig(scorer=s)
                score[s].append(median_time(lambda: patchify(img, cfg), args.repeats))
            if extra:
                score[extra[0]].append(median_time(lambda: full_pyramid(img), args.repeats))
            rows, channels = as_rows(img)
            floor_bins.append(median_time(lambda: _floor_passes(rows, channels, full_cfg.patch_size, False), args.repeats))
            floor_count.append(median_time(lambda: _floor_passes(rows, channels, full_cfg.patch_size, True), args.repeats))
            layout = patchify(img, APTConfig())
            kept.append(len(layout) / layout.uniform_tokens)
        d = np.mean(dec) * 1e6
        cols = " | ".join(f"{np.mean(score[s]) * 1e6:.0f}" for s in args.scorers + extra)
        ent = np.mean(score["entropy"]) * 1e6 if "entropy" in score else float("nan")
        fb, fc = np.mean(floor_bins) * 1e6, np.mean(floor_count) * 1e6
        print(f"| {size} | {np.mean(kept):.1%} | {d:.0f} | {cols} | {ent / d:.1%} | {fb:.0f} | {fc:.0f} | {fc / d:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
