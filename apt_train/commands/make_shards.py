"""``apt-make-shards`` (``tools/make_shards.py``): build webdataset shards + a Parquet index (with APT score maps and token counts) from images.

    apt-make-shards SRC OUT --image-size 224 --shard-size 100 [--crop | --keep-aspect]
        [--patch-size 16 --num-scales 3 --thresholds 5.5 4.0 --scorer entropy] [--workers N]
        [--limit-per-class K] [--skip-per-class N] [--prefix train] [--seed 0] [--no-shuffle]
        [--classes imagenet-classes.tsv] [--validate] [--strict] [--remove-sidecars]
        [--part K --num-parts N | --merge] [--masks DIR [--reduce-zero-label] [--void ID ...]]

SRC is an ImageNet-layout folder (one sub-folder per class) or a text/TSV list
(``path<TAB>label[<TAB>class]``). Writes ``OUT/{prefix}-000000.tar, ...``, ``OUT/{prefix}.parquet``
and ``OUT/classes.tsv``, atomically and resumably: a killed run leaves no partial .tar and a rerun
redoes only what is missing. The command line of `apt_data.shards.build.build_shards`; see
docs/shards.md.

On many machines (docs/scale-out.md): run ``--part K --num-parts N`` for K = 0..N-1 (any machine,
any order: a Slurm array, a Kubernetes indexed job), each with the same SRC, OUT (shared, or copied
together afterwards) and options; each builds shards K, K+N, ... Then the same command with
``--merge`` checks that every shard is there and writes the index: byte-identical to one machine's
build. To index existing webdataset tars without rewriting them: ``apt-index-shards``.

Segmentation (docs/dense.md): ``--masks DIR`` pairs each image of SRC with the mask of the same
relative path and stem in DIR and stores it as the sample's ``.seg.png`` member (keeping the image's
aspect: ``--keep-aspect`` is the default then); ``--reduce-zero-label`` / ``--void`` map the stored ids
once, at build time.
"""
from __future__ import annotations

import argparse
import logging
import sys

from apt_data.masks import MaskLabels
from apt_data.shards.build import build_shards

from ..flags import apt_config_from_flags
from .common import Argv, prog_name, run_command, setup_logging

log = logging.getLogger(__name__)

COMMAND = "apt-make-shards"


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module doc as written, and every option's default in --help."""


def parse_args(argv: Argv = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=prog_name(COMMAND), description=__doc__, formatter_class=_Formatter)
    ap.add_argument("src", help="ImageNet-layout folder, or a text/TSV list: path<TAB>label[<TAB>class]")
    ap.add_argument("out", help="output folder")
    ap.add_argument("--image-size", type=int, default=224, help="stored size (crop: side; keep-aspect: short side)")
    ap.add_argument("--shard-size", type=int, default=100, help="samples per shard")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--crop", dest="crop", action="store_true", default=None,
                   help="resize + centre-crop to a square (the default without --masks)")
    g.add_argument("--keep-aspect", dest="crop", action="store_false",
                   help="short side = image size, sides multiples of --multiple (the default with --masks)")
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--num-scales", type=int, default=3)
    ap.add_argument("--thresholds", type=float, nargs="*", default=None, help="default: the scorer's own (entropy: 5.5 4.0)")
    ap.add_argument("--scorer", default="entropy")
    ap.add_argument("--multiple", type=int, default=None, help="--keep-aspect side rounding (default: patch size)")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    ap.add_argument("--exif-transpose", action="store_true",
                    help="apply each photo's EXIF orientation before resizing (default: ignored, as timm does)")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    ap.add_argument("--limit-per-class", type=int, default=None, help="take K images per class")
    ap.add_argument("--skip-per-class", type=int, default=0, help="after skipping N per class (disjoint splits)")
    ap.add_argument("--prefix", default="train", help="shard name prefix and index name (OUT/PREFIX.parquet)")
    ap.add_argument("--seed", type=int, default=0, help="picks per class and the sample order")
    ap.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="keep sorted (class, file) order")
    ap.add_argument("--classes", default=None, help="TSV index<TAB>wnid<TAB>name (ImageNet-1k) to record in the metadata")
    ap.add_argument("--validate", action="store_true", help="re-read each shard, decoding every JPEG, before it counts as done")
    ap.add_argument("--strict", action="store_true", help="stop at the first unreadable source instead of skipping it")
    ap.add_argument("--remove-sidecars", dest="keep_sidecars", action="store_false",
                    help="delete the per-shard .idx.json files once the index is written (a rerun then rebuilds)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar (there is none when stderr is not a terminal)")
    ap.add_argument("--part", type=int, default=None, help="build only part K (0-based) of --num-parts: shards K, K+N, ...")
    ap.add_argument("--num-parts", type=int, default=1, help="N, the number of parts of a split build")
    ap.add_argument("--merge", action="store_true", help="after all parts: check every shard is there, write the index")
    m = ap.add_argument_group("segmentation")
    m.add_argument("--masks", default=None, metavar="DIR", help="the masks of SRC's images (same relative path and stem)")
    m.add_argument("--reduce-zero-label", action="store_true", help="mask id 0 ignored, 1..K stored as 0..K-1 (ADE20K)")
    m.add_argument("--void", type=int, nargs="+", default=None, metavar="ID", help="mask ids stored as ignored")
    a = ap.parse_args(argv)
    if a.masks is None and (a.reduce_zero_label or a.void):
        ap.error("--reduce-zero-label and --void need --masks DIR")
    if a.crop is None:
        a.crop = a.masks is None
    if a.part is None and a.num_parts != 1:
        ap.error("--num-parts needs --part K")
    if a.part is not None and not 0 <= a.part < a.num_parts:
        ap.error(f"--part {a.part} outside 0..{a.num_parts - 1}")
    if a.part is not None and a.merge:
        ap.error("--merge is a separate run, after every --part")
    return a


def _run(argv: Argv) -> int:
    a = parse_args(argv)
    cfg = apt_config_from_flags(a)
    res = build_shards(a.src, a.out, image_size=a.image_size, shard_size=a.shard_size, crop=a.crop, cfg=cfg,
                       workers=a.workers, limit_per_class=a.limit_per_class, skip_per_class=a.skip_per_class,
                       prefix=a.prefix, seed=a.seed, shuffle=a.shuffle, quality=a.quality, multiple=a.multiple,
                       classes_tsv=a.classes, validate=a.validate, strict=a.strict, progress=not a.quiet,
                       keep_sidecars=a.keep_sidecars, part=a.part, num_parts=a.num_parts,
                       merge=a.merge, exif_transpose=a.exif_transpose, masks=a.masks,
                       mask_labels=MaskLabels(a.reduce_zero_label, tuple(a.void or ())) if a.masks else None)
    log.info("make_shards: %s", res.summary())
    return 0 if res.num_samples else 1


def main(argv: Argv = None) -> int:
    """Run; 0 when done, 2 on a bad flag, setting or input (one ``error:`` line)."""
    setup_logging()
    return run_command(COMMAND, _run, argv, errors=(RuntimeError,))


if __name__ == "__main__":
    sys.exit(main())
