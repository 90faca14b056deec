#!/usr/bin/env python
"""Peak RSS of an augmenting loader worker's per-sample path on large images, before and after the
bounded decode: one child process per case, each reporting ``resource.getrusage`` max RSS.

    .venv/bin/python benchmarks/bench_decode_memory.py [--size 224] [--keep DIR]

Cases (written to a temporary folder first): a 12000x12000 flat-colour PNG (about 480 KB, what
issue 24 found: 144 M pixels, over the default decode limit), a 9000x9000 one (81 M pixels, under
it) and an 8000x8000 JPEG (a real photo, upscaled). Paths, each in its own child:
``full`` decodes at full size and then crops (the code before the bounded decode, kept as
`apt_data.transforms._decoded` + `ImageTransform._augment`); ``bounded`` is `ImageTransform` now
(reduced decode, the default ``max_pixels``); ``bounded, no limit`` sets ``max_pixels=None``. Each
child runs `SamplePipeline.load` (read -> transform -> patchify) of a one-image folder, after a
warm-up on a small photo, and prints its peak RSS and the rise over the warm-up peak.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_common import ROOT

PHOTO = ROOT / "tests" / "data" / "images" / "n01440764_tench.JPEG"
CASES = {"png12k": "12000x12000 PNG", "png9k": "9000x9000 PNG", "jpeg8k": "8000x8000 JPEG"}
PATHS = ("full", "bounded", "bounded, no limit")


def make_cases(folder: Path) -> dict[str, Path]:
    """The two large images, each alone in an ImageNet-layout folder ``folder/<case>/c/``."""
    from PIL import Image, ImageDraw

    out = {}
    for case in CASES:
        d = folder / case / "c"
        d.mkdir(parents=True, exist_ok=True)
        out[case] = folder / case
        if case.startswith("png"):
            side = int(case[3:-1]) * 1000
            im = Image.new("RGB", (side, side), (90, 140, 200))
            ImageDraw.Draw(im).ellipse((side // 4, side // 4, 3 * side // 4, 3 * side // 4), fill=(200, 120, 40))
            im.save(d / "big.png")
        else:
            with Image.open(PHOTO) as p:
                p.convert("RGB").resize((8000, 8000), Image.BICUBIC).save(d / "big.jpg", quality=90)
    return out


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(folder: str, path: str, size: int) -> None:
    """One measurement: prints a JSON line."""
    import shutil

    from apt_data import APTConfig
    from apt_data.pipeline import SamplePipeline, skip_reason
    from apt_data.sources.folder import FolderSource
    from apt_data.transforms import ImageTransform, _decoded

    class FullDecode(ImageTransform):
        """The augmenting path before the bounded decode: full-size pixels, crop drawn on them."""

        def _decode(self, data, name):
            pixels = _decoded(data, name, self.exif_transpose)
            return pixels, pixels.shape[:2], 1.0

    kind = FullDecode if path == "full" else ImageTransform
    extra = {"max_pixels": None} if path == "bounded, no limit" else {}
    transform = kind(size=size, augment=True, **extra)
    with tempfile.TemporaryDirectory() as warm:
        (Path(warm) / "c").mkdir()
        shutil.copy(PHOTO, Path(warm) / "c" / PHOTO.name)
        SamplePipeline(FolderSource(warm), APTConfig(), transform).load(0, 0)  # imports, Numba, allocator
    pipe = SamplePipeline(FolderSource(folder), APTConfig(), transform)
    base = maxrss_mb()
    try:
        img, layout, _ = pipe.load(0, 0)
        result = f"{img.shape[1]}x{img.shape[0]}, {len(layout)} tokens"
    except ValueError as e:
        result = f"skipped, {skip_reason(e)}: {e}"
    print(json.dumps({"peak_mb": maxrss_mb(), "rise_mb": maxrss_mb() - base, "result": result}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224, help="output size of the random resized crop (default: %(default)s)")
    ap.add_argument("--keep", type=Path, help="write the images here (default: a temporary folder)")
    ap.add_argument("--child", nargs=2, metavar=("FOLDER", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--make", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.size)
        return 0
    if args.make:
        make_cases(args.make)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        # written by a child: Linux carries a process's peak RSS across exec into the children it starts
        subprocess.run([sys.executable, __file__, "--make", str(folder)], check=True)
        cases = {case: folder / case for case in CASES}
        print(f"peak RSS of one augmenting sample (size {args.size}), one child process each; rise over the warm-up peak")
        print(f"{'image':<16} {'path':<18} {'peak MB':>8} {'rise MB':>8}  result")
        for case, where in cases.items():
            file = next((where / "c").iterdir())
            for path in PATHS:
                out = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--child", str(where), path],
                                     capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{CASES[case]:<16} {path:<18} {r['peak_mb']:8.0f} {r['rise_mb']:8.0f}  {r['result'][:90]}"
                      + (f"  ({file.stat().st_size / 1e3:.0f} KB file)" if path == "full" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
