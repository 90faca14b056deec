#!/usr/bin/env python
"""Label-free high-resolution study (issue 14): how close APT's DINOv2 features stay to the full-resolution
model's, against lower resolution (and random dropping) at equal tokens per image.

    python studies/study_hires.py [--photos ../shared/data/hires-photos] [--weights ../shared/models/...]
        [--sizes 448 672 896] [--grid 5.5,4.0 6.0,4.5 6.5,5.0 7.0,5.5] [--images N] [--output docs/results]
        [--quick]

There is no labelled high-resolution set here, so agreement with the full-resolution model stands in for
accuracy. For each size S of ``--sizes`` (multiples of 56 px: the 14/28/56-px APT scales tile it) every photo
is decoded as the study's 224-px images are (`study_parts.load_images`: short side resized to S, bicubic, centre
crop to S x S; a square keeps one grid per size and an exact lower-resolution square at any token count), then:

- **reference**: the vanilla timm model (``dynamic_img_size=True``: positions resampled bicubically from the
  16x16 table to the S/14 grid) on the S x S image: its final-norm CLS token and patch-feature map.
- **vanilla, APT path** (the first ``--check`` photos): the converted `APTViT` with no large patches on the
  same image. Must equal the reference (CLS and dense cosine 1 within 1e-4): a check of the comparison.
- **APT entropy** at each threshold pair: `from_timm` of the same weights **at init** (the zero-initialised
  detail path, so equal to resize-only; there is no fine-tuned APT here, so this is APT's zero-shot floor).
  CLS = the model's pooled pre-logits; dense = `APTViT.forward_dense` (each large token repeated over the
  cells it covers), compared cell by cell with the reference map and averaged over cells.
- **lower resolution** at equal tokens *per image*: the photo decoded to the multiple-of-14 square whose
  uniform grid is closest to that image's APT token count, through the vanilla model; its patch map is
  upsampled bilinearly to the reference grid for the dense cosine.
- **random drop** at APT's count per image (`random_base_layout`, seed ``[seed, size, pair, image]``): the
  dropped cells of its dense map take their nearest kept cell's feature (the fair analogue of APT's repeat).

Figures per row: tokens kept (mean % of the S/14 grid), mean CLS cosine ± SE over photos, mean dense cosine
± SE, FLOPs vs the reference (`apt_train.flops`: `vit_flops` of APT/random batches, detail path counted;
`timm_vit_flops` for the uniform grids), and per threshold the paired per-photo difference APT - lower
resolution ± its SE. Writes ``OUTPUT/hires.md``, ``OUTPUT/hires.png`` (CLS and dense cosine against tokens
kept, one panel per size) and ``OUTPUT/hires.json``; prints the table. ``--quick``: 2 photos, 448 px, one
pair (the test).
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
import torch.nn.functional as F

from apt_data import APTConfig, pack_images, patchify
from apt_train.evaluation import random_base_layout
from apt_train.flops import timm_vit_flops, vit_flops

from study_parts import (
    ROOT, DEFAULT_WEIGHTS, MODEL, NEG, PATCH, SIZE, backbone, load_images, log, lowres_side, mean_se, parse_pair, write_text)

DEFAULT_PHOTOS = ROOT.parent / "shared" / "data" / "hires-photos"
GRID = [(5.5, 4.0), (6.0, 4.5), (6.5, 5.0), (7.0, 5.5)]
METHODS = ("APT entropy", "lower resolution", "random drop")


def list_photos(folder: Path) -> list[Path]:
    """The photos named in ``MANIFEST.tsv`` (first column), in its order; every jpg/png if it is absent."""
    man = folder / "MANIFEST.tsv"
    if man.is_file():
        names = [ln.split("\t")[0] for ln in man.read_text().splitlines()[1:] if ln.strip()]
        return [folder / n for n in names if (folder / n).is_file()]
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def reference_model(weights: Path):
    """The vanilla timm model at any size: ``dynamic_img_size`` resamples the 16x16 position table per input,
    as `APTViT` does (weights loaded and checked by `study_parts.backbone`)."""
    import timm

    m = timm.create_model(MODEL, pretrained=False, img_size=SIZE, num_classes=0, dynamic_img_size=True)
    m.load_state_dict(backbone(weights).state_dict())
    return m.eval()


@torch.no_grad()
def vanilla_features(model, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS ``[D]`` and patch map ``[D, g, g]`` of the timm model (final norm) on one uint8 image."""
    cfg = model.pretrained_cfg
    x = torch.tensor(image).permute(2, 0, 1)[None].float() / 255  # a copy: decoded arrays may be read-only
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    t = model.forward_features(x)[0]  # [1 + g*g, D] (no registers in this model)
    g = image.shape[0] // PATCH
    return t[0], t[model.num_prefix_tokens:].T.reshape(-1, g, g)


@torch.no_grad()
def apt_features(model, image: np.ndarray, cfg: APTConfig, layout) -> tuple[torch.Tensor, torch.Tensor, float]:
    """CLS ``[D]``, dense map ``[D, G, G]`` (large tokens repeated over their cells) and FLOPs of `APTViT`."""
    from apt_model import to_dense

    batch = pack_images([image], cfg, num_prefix_tokens=model.num_prefix_tokens, layouts=[layout])
    tokens, _ = model.forward_features(batch)
    cls = model.forward_head(tokens, batch, pre_logits=True)[0]
    return cls, to_dense(tokens, batch)[0], vit_flops(batch, model)


def fill_nearest(dense: torch.Tensor, layout) -> torch.Tensor:
    """A base-cell layout's dense map with every dropped cell given its nearest kept cell's feature."""
    D, G, _ = dense.shape
    cells = torch.stack(torch.meshgrid(torch.arange(G), torch.arange(G), indexing="ij"), -1).reshape(-1, 2).float()
    kept = torch.from_numpy(np.stack([layout.y, layout.x], 1) // PATCH).float()
    near = torch.cdist(cells, kept).argmin(1)  # [G*G] index into kept
    flat_kept = (kept[:, 0] * G + kept[:, 1]).long()
    return dense.reshape(D, -1)[:, flat_kept[near]].reshape(D, G, G)


def cos_cls(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=0))


def cos_dense(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine per cell of two ``[D, G, G]`` maps, averaged over cells."""
    return float(F.cosine_similarity(a.double(), b.double(), dim=0).mean())


# ------------------------------------------------------------------------------------ reporting
HEADER = ("| size | method | setting | photos | tokens kept (per photo) | CLS cosine ± SE | dense cosine ± SE | "
          "FLOPs vs full res | APT - lower res: CLS ± SE | APT - lower res: dense ± SE |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def summarise(size: int, method: str, setting: str, per: list[dict]) -> dict:
    """Mean ± SE over photos of one row's per-photo figures."""
    G2 = (size // PATCH) ** 2
    cls, cls_se = mean_se([p["cls"] for p in per])
    dense, dense_se = mean_se([p["dense"] for p in per])
    return dict(size=size, method=method, setting=setting, n=len(per), tokens=float(np.mean([p["tokens"] for p in per])),
                fraction=float(np.mean([p["tokens"] for p in per])) / G2, cls=cls, cls_se=cls_se, dense=dense,
                dense_se=dense_se, flop_ratio=float(np.mean([p["flop_ratio"] for p in per])),
                per_photo=per)


def add_paired(row: dict, low: dict) -> None:
    """APT - lower resolution per photo, mean ± SE (paired: the photo-to-photo spread cancels)."""
    for k in ("cls", "dense"):
        row[f"{k}_vs_low"], row[f"{k}_vs_low_se"] = mean_se(
            [a[k] - b[k] for a, b in zip(row["per_photo"], low["per_photo"])])


def fmt_row(r: dict) -> str:
    paired = (f"{r['cls_vs_low']:+.4f} ± {r['cls_vs_low_se']:.4f} | {r['dense_vs_low']:+.4f} ± {r['dense_vs_low_se']:.4f}"
              if "cls_vs_low" in r else " | ")
    return (f"| {r['size']} | {r['method']} | {r['setting']} | {r['n']} | {r['fraction']:.1%} ({r['tokens']:.0f}) | "
            f"{r['cls']:.4f} ± {r['cls_se']:.4f} | {r['dense']:.4f} ± {r['dense_se']:.4f} | {r['flop_ratio']:.2f} | "
            f"{paired} |")


def plot(rows: list[dict], sizes: list[int], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(sizes), figsize=(4.2 * len(sizes) + 0.6, 7.2), squeeze=False)
    styles = {"APT entropy": "o-", "lower resolution": "D--", "random drop": "x:"}
    for j, size in enumerate(sizes):
        for i, (key, label) in enumerate((("cls", "CLS cosine to full res"), ("dense", "dense cosine to full res"))):
            ax = axes[i, j]
            for m, st in styles.items():
                pts = sorted((r for r in rows if r["size"] == size and r["method"] == m), key=lambda r: r["fraction"])
                if pts:
                    ax.errorbar([r["fraction"] * 100 for r in pts], [r[key] for r in pts],
                                yerr=[r[f"{key}_se"] for r in pts], fmt=st, capsize=3, label=m, alpha=0.85)
            ax.plot([100], [1.0], "k*", ms=10, label="full resolution")
            ax.set_xlabel(f"patch tokens kept (% of the {size // PATCH}x{size // PATCH} grid)")
            ax.set_ylabel(label + " (± SE)")
            ax.set_title(f"{size} px", fontsize=10)
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--photos", default=str(DEFAULT_PHOTOS), help="folder of photos (MANIFEST.tsv lists them)")
    ap.add_argument("--output", default=str(ROOT / "docs" / "results"))
    ap.add_argument("--sizes", nargs="+", type=int, default=[448, 672, 896])
    ap.add_argument("--grid", nargs="+", type=parse_pair, default=GRID)
    ap.add_argument("--images", type=int, default=None, help="use N photos (a seeded choice; default all)")
    ap.add_argument("--check", type=int, default=2, help="photos per size for the vanilla-APT-path check")
    ap.add_argument("--no-random", action="store_true", help="skip the random-drop rows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="2 photos, 448 px, one threshold pair (the test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.sizes, args.grid = 2, [448], args.grid[:1]
    for s in args.sizes:
        if s % (PATCH * 4):
            ap.error(f"--sizes: {s} is not a multiple of {PATCH * 4} px (the largest APT patch)")
    weights, photos_dir, out = Path(args.weights), Path(args.photos), Path(args.output)
    if not weights.is_file():
        ap.error(f"weights {weights} not found")
    if not photos_dir.is_dir():
        ap.error(f"photos {photos_dir} not found")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    photos = list_photos(photos_dir)
    if args.images and args.images < len(photos):
        pick = np.sort(np.random.default_rng(args.seed).choice(len(photos), args.images, replace=False))
        photos = [photos[i] for i in pick]
    out.mkdir(parents=True, exist_ok=True)
    command = "python studies/study_hires.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    log(f"study_hires: {MODEL} from {weights.name}; {len(photos)} photos from {photos_dir}; sizes {args.sizes}; "
        f"grid {args.grid}; {torch.get_num_threads()} threads")

    from apt_model import from_timm

    ref = reference_model(weights)
    apt = from_timm(backbone(weights)).eval()  # at init: detail path zero, i.e. resize-only
    uni = APTConfig(patch_size=PATCH, num_scales=3, thresholds=NEG)
    rows, timings, t_all = [], {}, time.perf_counter()
    log(HEADER)
    for si, size in enumerate(args.sizes):
        t0 = time.perf_counter()
        G = size // PATCH
        full_flops = timm_vit_flops(ref, 1, G * G)
        per = {("check", None): []}
        per.update({(m, th): [] for th in args.grid for m in METHODS if not (m == "random drop" and args.no_random)})
        for k, path in enumerate(photos):
            img = load_images([path], size)[0]
            r_cls, r_map = vanilla_features(ref, img)
            if k < args.check:
                c, d, fl = apt_features(apt, img, uni, patchify(img, uni))
                per[("check", None)].append(dict(photo=path.name, tokens=G * G, cls=cos_cls(c, r_cls),
                                                 dense=cos_dense(d, r_map), flop_ratio=fl / full_flops))
            for ti, th in enumerate(args.grid):
                cfg = APTConfig(patch_size=PATCH, num_scales=3, thresholds=th)
                lay = patchify(img, cfg)
                n = len(lay)
                c, d, fl = apt_features(apt, img, cfg, lay)
                per[("APT entropy", th)].append(dict(photo=path.name, tokens=n, cls=cos_cls(c, r_cls),
                                                     dense=cos_dense(d, r_map), flop_ratio=fl / full_flops))
                px = lowres_side(n, G)
                c, m = vanilla_features(ref, load_images([path], px)[0])
                up = F.interpolate(m[None], size=(G, G), mode="bilinear", align_corners=False)[0]
                per[("lower resolution", th)].append(dict(
                    photo=path.name, tokens=(px // PATCH) ** 2, px=px, cls=cos_cls(c, r_cls), dense=cos_dense(up, r_map),
                    flop_ratio=timm_vit_flops(ref, 1, (px // PATCH) ** 2) / full_flops))
                if not args.no_random:
                    rl = random_base_layout(img.shape[:2], cfg, n, np.random.default_rng([args.seed, si, ti, k]))
                    c, d, fl = apt_features(apt, img, cfg, rl)
                    per[("random drop", th)].append(dict(photo=path.name, tokens=n, cls=cos_cls(c, r_cls),
                                                         dense=cos_dense(fill_nearest(d, rl), r_map),
                                                         flop_ratio=fl / full_flops))
            log(f"  {size} px: photo {k + 1}/{len(photos)} {path.name} ({time.perf_counter() - t0:.0f} s)")
        full = dict(size=size, method="full resolution (reference)", setting=f"{size} px, timm dynamic_img_size",
                    n=len(photos), tokens=G * G, fraction=1.0, cls=1.0, cls_se=0.0, dense=1.0, dense_se=0.0,
                    flop_ratio=1.0, per_photo=[])
        size_rows = [full, summarise(size, "vanilla, APT path", "no large patches", per[("check", None)])]
        for th in args.grid:
            st = f"({th[0]:g}, {th[1]:g})"
            a = summarise(size, "APT entropy", st + " at init", per[("APT entropy", th)])
            pxs = [p["px"] for p in per[("lower resolution", th)]]
            lo = summarise(size, "lower resolution", f"{min(pxs)}-{max(pxs)} px, APT {st}'s count",
                           per[("lower resolution", th)])
            add_paired(a, lo)
            size_rows += [a, lo]
            if not args.no_random:
                size_rows.append(summarise(size, "random drop", f"APT {st}'s count", per[("random drop", th)]))
        for r in size_rows:
            log(fmt_row(r))
        rows += size_rows
        timings[f"{size} px"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all

    table = "\n".join([HEADER] + [fmt_row(r) for r in rows])
    title = f"DINOv2 ViT-S/14 features vs the full-resolution model's, {len(photos)} photos (APT at init, no labels)"
    plot(rows, args.sizes, out / "hires.png", title)
    settings = (
        f"- model: `{MODEL}` (DINOv2 ViT-S/14, `{weights.name}`), 14-px patches, APT scales 14/28/56 px, entropy "
        f"scorer; APT = `from_timm` of the same weights at init (zero detail path = resize-only: no fine-tuned APT "
        f"exists here, so these are zero-shot figures)\n"
        f"- photos: {len(photos)} of `{photos_dir.name}` ({'all' if not args.images else f'seeded choice, seed {args.seed}'}"
        f"): {', '.join(p.name for p in photos)}\n"
        f"- each photo: short side resized (bicubic) to the size, centre-cropped to a square (aspect not kept)\n"
        f"- reference: the vanilla timm model (`dynamic_img_size`) at the full size; CLS = final-norm class token, "
        f"dense = final-norm patch tokens; cosines in float64, dense = mean over the size/14 grid's cells\n"
        f"- lower resolution: per photo, the multiple-of-14 square whose grid is closest to that photo's APT token "
        f"count, decoded from the original file; patch map upsampled bilinearly to the reference grid\n"
        f"- random drop: APT's count per photo as random base cells; dropped cells take their nearest kept cell's "
        f"feature in the dense map\n"
        f"- vanilla, APT path: `APTViT` with no large patches on the first {args.check} photos (a check: must be 1)\n"
        f"- SE: standard error of the mean over photos (sample std / sqrt(n)); APT - lower res: the paired per-photo "
        f"difference, mean ± SE\n"
        f"- FLOPs: `apt_train.flops` (analytic; APT's detail path counted) / the full-size uniform grid\n"
        f"- {torch.get_num_threads()} CPU threads, seed {args.seed}; run times: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + "\n")
    md = (f"# High-resolution, label-free: APT vs lower resolution at equal tokens (generated by "
          f"`studies/study_hires.py`)\n\n"
          f"Command (from the repository root, with `../shared` present):\n\n```bash\n.venv/bin/{command}\n```\n\n"
          f"{settings}\n{table}\n\n![cosine to the full-resolution features against tokens kept](hires.png)\n")
    write_text(out / "hires.md", md)
    write_text(out / "hires.json", json.dumps(dict(command=command, args={k: str(v) for k, v in vars(args).items()},
                                                   photos=[p.name for p in photos], rows=rows, timings=timings),
                                              indent=1))
    log("\n" + table)
    log(f"wrote {out / 'hires.md'}, {out / 'hires.png'}, {out / 'hires.json'}; total {timings['total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
