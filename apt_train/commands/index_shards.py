"""``apt-index-shards`` (``tools/index_shards.py``): index plain webdataset shards in place: write the Parquet index APTLoader plans and seeks by.

    apt-index-shards 'data/shard-{000000..000099}.tar' --out data/train.parquet
        [--label-field label] [--image-size 224] [--keep-aspect] [--patch-size 16 --num-scales 3
        --thresholds 5.5 4.0 --scorer entropy] [--workers N] [--strict] [--quiet]

Scans each tar once (.jpg/.jpeg/.png/.webp images; labels from .cls, or from a field of the .json
member with --label-field, dots for nested fields), computes every image's APT token counts at the
loader's eval transform for --image-size, and writes --out with member offsets, sizes, checksums
and labels. The tars are not rewritten; `APTLoader("data/train.parquet", ...)` (or the tars' folder)
then reads them with one ranged read per sample. Shard names in the index are relative to its
folder, so keep it beside the tars (or as a URL beside them on object storage). See
docs/scale-out.md.
"""
from __future__ import annotations

import argparse
import logging
import sys

from apt_data.shards.inplace import index_webdataset

from ..flags import apt_config_from_flags
from .common import Argv, prog_name, run_command, setup_logging

log = logging.getLogger(__name__)

COMMAND = "apt-index-shards"


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def parse_args(argv: Argv = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=prog_name(COMMAND), description=__doc__, formatter_class=_Formatter)
    ap.add_argument("tars", nargs="+", help="webdataset shards: paths or brace patterns")
    ap.add_argument("--out", required=True, help="the index to write, e.g. DIR/train.parquet (beside the tars)")
    ap.add_argument("--label-field", default=None, help="take labels from this .json field instead of .cls")
    ap.add_argument("--image-size", type=int, default=224, help="the loader's image size the counts are for")
    ap.add_argument("--keep-aspect", dest="crop", action="store_false", help="counts for keep-aspect resizing")
    ap.add_argument("--multiple", type=int, default=None, help="--keep-aspect side rounding (default: patch size)")
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--num-scales", type=int, default=3)
    ap.add_argument("--thresholds", type=float, nargs="*", default=None, help="default: the scorer's own (entropy: 5.5 4.0)")
    ap.add_argument("--scorer", default="entropy")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    ap.add_argument("--strict", action="store_true", help="stop at the first bad sample")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def _run(argv: Argv) -> int:
    a = parse_args(argv)
    cfg = apt_config_from_flags(a)
    res = index_webdataset(a.tars, a.out, cfg=cfg, image_size=a.image_size, crop=a.crop, multiple=a.multiple,
                           label_field=a.label_field, workers=a.workers, strict=a.strict, progress=not a.quiet)
    log.info("index_shards: %s", res.summary())
    return 0


def main(argv: Argv = None) -> int:
    """Run; 0 when done, 2 on a bad flag, setting or input (one ``error:`` line)."""
    setup_logging()
    return run_command(COMMAND, _run, argv, errors=(RuntimeError,))


if __name__ == "__main__":
    sys.exit(main())
