"""``apt-visualize`` (``tools/visualize.py``): draw APT patch layouts over images and write them as PNGs.

    apt-visualize IMAGE [IMAGE ...] --out DIR [--size PX] [--thresholds T1 T2]
    apt-visualize IMAGE [IMAGE ...] --mosaic FILE.png [--size PX] [--cols N]

Per image, ``DIR/<name>.layout.png`` is the image with its layout drawn on it (white patch borders,
each scale above the base one tinted its own colour), captioned with its token count, above the legend
of the patch sizes' colours; files of one name
from different folders get the folder in their name (``cats__img_001.layout.png``). ``--mosaic`` writes
all the layouts side by side in one PNG, each captioned with its token count, above a legend of
the patch sizes (the picture in the README is made this way). Without ``--size`` an image keeps
its own size (its short side capped at ``--max-size``, and each side cut down to a multiple of the
patch size): nothing is upscaled. ``--size PX`` resizes the short side to PX, upscaling if needed.

Prints, per image, the tokens APT uses against the uniform grid of a plain ViT, and the legend.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from apt_data import APTConfig, decode_image, patchify
from apt_data.visualize import SCALE_COLORS, draw_layout

from .common import Argv, prog_name, run_command, setup_logging

COMMAND = "apt-visualize"
log = logging.getLogger("apt_train.visualize")

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
#: names of apt_data.visualize.SCALE_COLORS, for the printed legend (scale 0 is untinted)
COLOR_NAMES = ["untinted", "blue", "orange", "green", "red", "violet"]


def font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, OSError):
        return ImageFont.load_default()


def load(path: str, size: int | None, max_size: int, patch: int, crop: bool = False) -> np.ndarray:
    """Decode ``path`` for drawing. ``size``: short side in px (resized, maybe upscaled). ``None``:
    the image's own size, short side capped at ``max_size`` (only ever shrunk), sides cut to a
    multiple of ``patch``. ``crop``: then centre-crop a square of the short side."""
    if size is not None:
        img = decode_image(path, size, crop=False, multiple=patch)
    else:
        img = decode_image(path)
    h, w = img.shape[:2]
    if size is None and min(h, w) > max_size:
        short = max(patch, max_size // patch * patch)
        scale = short / min(h, w)
        nh, nw = (short, int(w * scale) // patch * patch) if h <= w else (int(h * scale) // patch * patch, short)
        img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC))
    h, w = img.shape[0] // patch * patch, img.shape[1] // patch * patch
    if crop:
        h = w = min(h, w)
    if h == 0 or w == 0:
        raise ValueError(f"{path}: {img.shape[1]}x{img.shape[0]} is smaller than one {patch}-px patch")
    top, left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    return np.ascontiguousarray(img[top:top + h, left:left + w])


def scale_labels(cfg: APTConfig) -> list[str]:
    return [f"{cfg.patch_size << s} px" for s in range(cfg.num_scales)]


def legend(cfg: APTConfig, width: int, text_size: int = 14) -> np.ndarray:
    """A strip with one swatch per scale, in the colour ``draw_layout`` tints it with, and its patch
    size; ``width`` px wide, or wider when the legend needs it."""
    f = font(text_size)
    sw = text_size + 6
    h = sw + 12
    strip = Image.new("RGB", (max(width, 2000), h), BACKGROUND)
    d = ImageDraw.Draw(strip)
    x = 8
    d.text((x, h // 2), "patch size:", fill=TEXT, font=f, anchor="lm")
    x += int(d.textlength("patch size:", font=f)) + 10
    for s, label in enumerate(scale_labels(cfg)):
        c = (160, 160, 160) if s == 0 else SCALE_COLORS[min(s, len(SCALE_COLORS) - 1)]
        y0 = (h - sw) // 2
        d.rectangle([x, y0, x + sw, y0 + sw], fill=tuple(int(round(v)) for v in c), outline=(255, 255, 255), width=2)
        d.rectangle([x - 1, y0 - 1, x + sw + 1, y0 + sw + 1], outline=(90, 90, 90), width=1)
        x += sw + 6
        text = label + (" (untinted)" if s == 0 else "")
        d.text((x, h // 2), text, fill=TEXT, font=f, anchor="lm")
        x += int(d.textlength(text, font=f)) + 16
    return np.asarray(strip)[:, :max(width, x - 8)]


def mosaic(tiles: list[tuple[np.ndarray, str]], cfg: APTConfig, cols: int, pad: int = 6, text_size: int = 14) -> np.ndarray:
    """Layouts in a grid, each captioned, with the legend below."""
    f = font(text_size)
    cap = text_size + 8
    cols = max(1, min(cols, len(tiles)))
    rows = -(-len(tiles) // cols)
    cell_w = max(t.shape[1] for t, _ in tiles)
    cell_h = max(t.shape[0] for t, _ in tiles) + cap
    width = cols * cell_w + (cols + 1) * pad
    canvas = Image.new("RGB", (width, rows * cell_h + (rows + 1) * pad), BACKGROUND)
    d = ImageDraw.Draw(canvas)
    for k, (tile, caption) in enumerate(tiles):
        r, c = divmod(k, cols)
        x, y = pad + c * (cell_w + pad), pad + r * (cell_h + pad)
        x += (cell_w - tile.shape[1]) // 2
        canvas.paste(Image.fromarray(tile), (x, y))
        d.text((x + tile.shape[1] // 2, y + tile.shape[0] + cap // 2), caption, fill=TEXT, font=f, anchor="mm")
    key = legend(cfg, width, text_size)
    out = np.full((canvas.height, key.shape[1], 3), BACKGROUND, np.uint8)
    out[:, :width] = np.asarray(canvas)
    return np.concatenate([out, key], axis=0)


def save_png(array: np.ndarray, out: Path, colors: int = 0) -> None:
    """Atomically write ``array`` as a PNG; ``colors > 0`` quantises to a palette (smaller files)."""
    im = Image.fromarray(array)
    if colors:
        im = im.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    tmp = out.with_name(out.stem + ".tmp.png")
    im.save(tmp, optimize=True)
    os.replace(tmp, out)


def output_names(paths: list[str]) -> list[str]:
    """One distinct output name per input: the file's stem, or where stems repeat (``a/x.jpg``,
    ``b/x.jpg``) its path below the inputs' common folder with ``/`` as ``__`` (``a__x``), keeping the
    extension where even that repeats (``x.jpg``, ``x.png``)."""
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    full = [Path(os.path.abspath(p)) for p in paths]
    common = Path(os.path.commonpath([str(f.parent) for f in full]))
    rel = [f.relative_to(common) for f in full]
    names = ["__".join(r.with_suffix("").parts) if stems.count(s) > 1 else s for r, s in zip(rel, stems)]
    return [("__".join(r.parts) if names.count(n) > 1 else n) for r, n in zip(rel, names)]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog_name(COMMAND), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="+", help="image files")
    ap.add_argument("--out", help="output folder for one <name>.layout.png per image (files of one name from "
                                  "different folders: <folder>__<name>.layout.png)")
    ap.add_argument("--mosaic", help="write all layouts, captioned, with a legend, into this one PNG")
    ap.add_argument("--cols", type=int, default=4, help="mosaic columns")
    ap.add_argument("--colors", type=int, default=0, help="quantise the mosaic to this many palette colours (0: RGB)")
    ap.add_argument("--size", type=int, default=None,
                    help="resize the short side to this many px (aspect kept, rounded to the patch size; may upscale). "
                         "Default: the image's own size, never upscaled")
    ap.add_argument("--alpha", type=float, default=0.35, help="tint strength of the scales above the base one")
    ap.add_argument("--crop", action="store_true", help="centre-crop each image to a square of its short side")
    ap.add_argument("--max-size", type=int, default=384, help="without --size: shrink short sides above this (px)")
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--num-scales", type=int, default=3)
    ap.add_argument("--thresholds", type=float, nargs="*", default=None,
                    help="per-scale thresholds (default: the scorer's own)")
    ap.add_argument("--scorer", default="entropy")
    return ap


def _visualize(argv: Argv) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if not args.out and not args.mosaic:
        ap.error("give --out DIR, --mosaic FILE.png, or both")
    if args.size is not None and args.size <= 0 or args.max_size < args.patch_size:
        ap.error("--size and --max-size must be at least one patch")
    cfg = APTConfig(args.patch_size, args.num_scales, None if args.thresholds is None else tuple(args.thresholds),
                    args.scorer)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    total = uniform = 0
    tiles = []
    for path, out_name in zip(args.images, output_names(args.images)):
        try:
            img = load(path, args.size, args.max_size, cfg.patch_size, args.crop)
        except ValueError as e:
            log.warning("skipped %s", e)
            continue
        layout = patchify(img, cfg)
        drawn = draw_layout(img, layout, alpha=args.alpha)
        counts = layout.counts()
        total += len(layout)
        uniform += layout.uniform_tokens
        where = ""
        name = Path(path).stem.split("_", 1)[-1].replace("_", " ")
        tiles.append((drawn, f"{name}: {len(layout)} / {layout.uniform_tokens} tokens"))
        if args.out:  # the layout captioned, with the colour legend below it, as in the mosaic
            out = Path(args.out) / (out_name + ".layout.png")
            save_png(mosaic(tiles[-1:], cfg, 1), out)
            where = f"  -> {out}"
        log.info(f"{Path(path).name}: {img.shape[1]}x{img.shape[0]}  tokens {len(layout)} / {layout.uniform_tokens} "
                 f"({len(layout) / layout.uniform_tokens:.1%})  per scale {counts.tolist()}{where}")
    if not tiles:
        raise ValueError(f"none of the {len(args.images)} images could be drawn (see the warnings above)")
    if uniform:
        log.info(f"total: {total} / {uniform} tokens ({total / uniform:.1%} of the uniform grid)")
    names = [COLOR_NAMES[min(s, len(COLOR_NAMES) - 1)] for s in range(cfg.num_scales)]
    log.info("legend: " + ", ".join(f"{lab} {n}" for lab, n in zip(scale_labels(cfg), names)))
    if args.mosaic and tiles:
        out = Path(args.mosaic)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_png(mosaic(tiles, cfg, args.cols), out, args.colors)
        log.info(f"mosaic: {out} ({out.stat().st_size / 1024:.0f} KiB)")
    return 0


def main(argv: Argv = None) -> int:
    """Draw; 0 when done, 2 on a bad flag, setting or input (one ``error:`` line)."""
    setup_logging()
    return run_command(COMMAND, _visualize, argv)


if __name__ == "__main__":
    sys.exit(main())
