"""``apt-calibrate`` (``tools/calibrate.py``): pick APT thresholds that keep a target fraction of the uniform grid's tokens (logic: apt_data/calibrate.py).

    apt-calibrate --target-fraction 0.7 [--data shards] [--samples 500] [--image-size 224]
        [--patch-size 16 --num-scales 3 --scorer entropy] [--base-thresholds 5.5 4.0] [--output OUT]

Scores a random sample of the dataset once (the shard index's stored score maps when they fit the
patch size, scales, scorer and image size; else decode + score), then bisects a scale factor
``alpha`` on the base thresholds (default: the paper's 5.5 4.0 for entropy). Prints the thresholds
and the fraction they achieve on the sample; pass them to train/evaluate with ``--thresholds``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from apt_data import SCORER_NAMES, APTConfig, ImageTransform
from apt_data.calibrate import calibrate, scored_sample
from apt_data.loader import open_source

from ..checkpoint import atomic_write_text
from .common import Argv, prog_name, run_command, sample_data, setup_logging

log = logging.getLogger(__name__)

COMMAND = "apt-calibrate"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog_name(COMMAND), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target-fraction", type=float, required=True, help="patch tokens kept / uniform grid, in (0, 1]")
    ap.add_argument("--data", default=sample_data() or "shards", help="shards[:split], index or image folder")
    ap.add_argument("--samples", type=int, default=500, help="random images scored (0: all)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--crop-pct", type=float, default=1.0)
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--num-scales", type=int, default=3)
    ap.add_argument("--scorer", choices=SCORER_NAMES, default="entropy")
    ap.add_argument("--base-thresholds", type=float, nargs="*", default=None,
                    help="direction of the search (default: 5.5 4.0, the paper's entropy thresholds; "
                         "required for other scorers or scales)")
    ap.add_argument("--tol", type=float, default=1e-3, help="stop when |fraction - target| <= tol")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", "--json", dest="json", default=None, help="write the result here as JSON (atomic)")
    return ap


def _calibrate(argv: Argv) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    base = args.base_thresholds
    if base is None:
        if args.scorer != "entropy" or args.num_scales != 3:
            ap.error("--base-thresholds is required for scorers other than entropy or num_scales != 3")
        base = [5.5, 4.0]
    cfg = APTConfig(patch_size=args.patch_size, num_scales=args.num_scales, thresholds=tuple(base),
                    scorer=args.scorer)
    transform = ImageTransform(size=args.image_size, multiple=args.patch_size, crop_pct=args.crop_pct)
    source = open_source(args.data)
    t0 = time.perf_counter()
    images, from_index = scored_sample(source, cfg, transform, args.samples or None, args.seed)
    t1 = time.perf_counter()
    cal = calibrate(images, cfg, args.target_fraction, base, tol=args.tol, from_index=from_index)
    t2 = time.perf_counter()
    log.info("calibrate: %d images of %s at %d px, %s scores %s (%.1f s)", len(images), args.data, args.image_size,
             args.scorer, "read from the shard index" if from_index else "computed from the decoded images", t1 - t0)
    print(f"thresholds {' '.join(f'{t:.4f}' for t in cal.thresholds)} (= {cal.scale:.4f} x "
          f"{' '.join(f'{b:g}' for b in base)}) keep {cal.fraction:.2%} of the uniform tokens "
          f"(target {cal.target:.2%}; search {t2 - t1:.1f} s)")
    print(f"use: --thresholds {' '.join(f'{t:.4f}' for t in cal.thresholds)}")
    if args.json:
        atomic_write_text(args.json, json.dumps({"thresholds": cal.thresholds, "scale": cal.scale, "fraction": cal.fraction,
                                                 "target": cal.target, "images": cal.images,
                                                 "from_index": cal.from_index, "scorer": args.scorer,
                                                 "patch_size": args.patch_size, "image_size": args.image_size}, indent=1))
    return 0


def main(argv: Argv = None) -> int:
    """Calibrate; 0 when done, 2 on a bad flag, setting or input (one ``error:`` line)."""
    setup_logging()
    return run_command(COMMAND, _calibrate, argv, flags={"thresholds": "--base-thresholds"})


if __name__ == "__main__":
    sys.exit(main())
