#!/usr/bin/env python
"""Can APT start better? Zero-shot ablation of the large-token embedding (issue 14).

    python studies/study_start.py [--val 600] [--head-train 1000] [--grid 5.5,4.0 6.5,5.0 7.0,5.5]
        [--mix 1 0.5 0] [--output docs/results] [--cache out/study] [--quick]

At init an APT model embeds a large token (side ``g * 14`` px) as ``E(Resize_14(P))``: the region shrunk
``g`` times into one 14-px patch, which the backbone never saw at that scale. The obvious alternative keeps
every pixel at its native scale: the **mean of the g x g sub-patch embeddings** ``mean_i E(P_i)`` (what the
detail path's averaging convs compute before its zero-initialised linear). This tool measures, on the
study's starting classifier (`studies/study.py` stage 1: the same split, features and linear head), the
zero-shot top-1 at equal tokens of the mix

    alpha * E(Resize_14(P)) + (1 - alpha) * mean_i E(P_i)        for each alpha of ``--mix``

(alpha 1 is APT at init, the paper's and our default; alpha 0 is the pure sub-patch mean), each against
vanilla on the same images (paired SE). Same layouts, same positions, same tokens: only the large tokens'
embedding differs. Writes ``OUTPUT/start.md`` and ``OUTPUT/start.json`` and prints the table. ``--quick``:
a few images (the test).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from apt_data import APTConfig, list_image_folder, pack_images, patchify
from apt_model import from_timm

from study_parts import (
    ROOT, DEFAULT_DATA, DEFAULT_WEIGHTS, NEG, PATCH, SIZE, backbone, cls_features, fit_head, load_images, log,
    paired_delta, parse_pair, se, stratified_split, write_text)


class MixedLargeTokenEmbed(nn.Module):
    """Wraps an `APTPatchEmbed`: scale-0 tokens as before; a larger token embedded as ``alpha`` times the
    resize path plus ``1 - alpha`` times the mean of its sub-patch embeddings (the wrapped module's own
    scale-0 embedding of each sub-patch, its norm included)."""

    def __init__(self, base: nn.Module, alpha: float):
        super().__init__()
        self.base, self.alpha = base, float(alpha)

    def forward(self, pixels: torch.Tensor, scale: int, resize_only: bool = False) -> torch.Tensor:
        resized = self.base(pixels, scale, resize_only=True)
        if scale == 0 or self.alpha == 1:
            return resized
        T, p, g = pixels.shape[0], self.base.patch_size, 1 << scale
        sub = pixels.view(T, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(T * g * g, 3, p, p)
        mean = self.base(sub, 0).view(T, g * g, -1).mean(1)
        return self.alpha * resized + (1 - self.alpha) * mean


@torch.no_grad()
def top1_hits(model, images, labels, cfg: APTConfig, layouts=None, bs: int = 32) -> tuple[np.ndarray, float]:
    """Per-image hits (0/1) and the fraction of the 224-px grid's tokens kept."""
    hits, tokens = [], 0
    for i in range(0, len(images), bs):
        lays = layouts[i:i + bs] if layouts is not None else None
        batch = pack_images(images[i:i + bs], cfg, labels=labels[i:i + bs], layouts=lays,
                            num_prefix_tokens=model.num_prefix_tokens)
        hits += (model(batch).argmax(1) == batch.labels).int().tolist()
        tokens += batch.num_real_tokens - batch.num_images * batch.num_prefix_tokens
    return np.asarray(hits), tokens / (len(images) * (SIZE // PATCH) ** 2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="ImageNet-layout folder of 224-px images")
    ap.add_argument("--output", default=str(ROOT / "docs" / "results"))
    ap.add_argument("--cache", default=str(ROOT / "out" / "study"), help="features (shared with studies/study.py)")
    ap.add_argument("--val", type=int, default=600)
    ap.add_argument("--head-train", type=int, default=1000)
    ap.add_argument("--head-wd", type=float, default=1e-4)
    ap.add_argument("--grid", nargs="+", type=parse_pair, default=[(5.5, 4.0), (6.5, 5.0), (7.0, 5.5)])
    ap.add_argument("--mix", nargs="+", type=float, default=[1.0, 0.5, 0.0],
                    help="alphas: the weight of the resize path (1 = APT at init)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a few images (the test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.val, args.head_train, args.grid, args.batch = 6, 10, args.grid[:1], 6
    torch.set_num_threads(args.threads)
    weights, out, cache = Path(args.weights), Path(args.output), Path(args.cache)
    if not weights.is_file():
        ap.error(f"weights {weights} not found")
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    command = "python studies/study_start.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    t_all = time.perf_counter()

    # the starting classifier of studies/study.py: same split, same cached features, same head
    entries = list_image_folder(args.data)
    labels = np.array([e[1] for e in entries])
    val_idx, train_idx = stratified_split(labels, args.val, args.seed)
    head_idx = train_idx[:args.head_train]
    val_images, val_labels = load_images([entries[i][0] for i in val_idx]), labels[val_idx].tolist()
    fpath = cache / f"feat-{len(entries)}-v{len(val_idx)}-h{len(head_idx)}-s{args.seed}.npz"
    if fpath.is_file():
        ftrain = np.load(fpath)["train"]
    else:
        vit = backbone(weights)
        ftrain = cls_features(vit, load_images([entries[i][0] for i in head_idx]), args.batch)
        fval = cls_features(vit, val_images, args.batch)
        np.savez(fpath.with_suffix(".tmp.npz"), train=ftrain, val=fval)
        os.replace(fpath.with_suffix(".tmp.npz"), fpath)
    W, b = fit_head(ftrain, labels[head_idx], int(labels.max()) + 1, args.head_wd, 300)
    clf = backbone(weights, num_classes=int(labels.max()) + 1)
    clf.head.weight.data.copy_(W)
    clf.head.bias.data.copy_(b)
    model = from_timm(clf).eval()
    base_embed = model.patch_embed
    log(f"study_start: {len(val_idx)} val images, head on {len(head_idx)}; alphas {args.mix}")

    uni = APTConfig(patch_size=PATCH, num_scales=3, thresholds=NEG)
    vanilla, _ = top1_hits(model, val_images, val_labels, uni, bs=args.batch)
    n = len(vanilla)
    rows = [dict(thresholds="vanilla", alpha=None, fraction=1.0, top1=float(vanilla.mean()), se=se(vanilla.mean(), n),
                 delta=None, delta_se=None, hits=vanilla.tolist())]
    header = ("| thresholds | tokens kept | large-token embedding | top-1 ± SE | Δ vs vanilla ± paired SE |\n"
              "|---|---|---|---|---|")
    log(header)

    def line(r):
        what = ("uniform grid (vanilla)" if r["alpha"] is None else "resize (APT at init)" if r["alpha"] == 1
                else "sub-patch mean" if r["alpha"] == 0 else f"{r['alpha']:g} resize + {1 - r['alpha']:g} sub-patch mean")
        delta = "" if r["delta"] is None else f"{r['delta'] * 100:+.1f} ± {r['delta_se'] * 100:.1f} pt"
        return (f"| {r['thresholds']} | {r['fraction']:.1%} | {what} | {r['top1']:.1%} ± {r['se']:.1%} | {delta} |")

    log(line(rows[0]))
    for th in args.grid:
        cfg = APTConfig(patch_size=PATCH, num_scales=3, thresholds=th)
        layouts = [patchify(im, cfg) for im in val_images]
        for alpha in args.mix:
            model.patch_embed = MixedLargeTokenEmbed(base_embed, alpha)
            hits, frac = top1_hits(model, val_images, val_labels, cfg, layouts, args.batch)
            d, dse = paired_delta(hits, vanilla)
            rows.append(dict(thresholds=f"({th[0]:g}, {th[1]:g})", alpha=alpha, fraction=frac, top1=float(hits.mean()),
                             se=se(hits.mean(), n), delta=d, delta_se=dse, hits=hits.tolist()))
            log(line(rows[-1]))
        model.patch_embed = base_embed
    secs = time.perf_counter() - t_all
    table = "\n".join([header] + [line(r) for r in rows])
    md = (f"# Can APT start better? The large-token embedding at init (generated by `studies/study_start.py`)\n\n"
          f"Command (from the repository root, with `../shared` present):\n\n```bash\n.venv/bin/{command}\n```\n\n"
          f"- the starting classifier of `studies/study.py` (DINOv2 ViT-S/14 + linear head fitted on the frozen "
          f"features of {len(head_idx)} train images), {n} val images of the same stratified split (seed {args.seed}), "
          f"224 px, APT scales 14/28/56 px, entropy layouts\n"
          f"- every row of a threshold pair has the same layouts, positions and token count: only the large "
          f"tokens' embedding differs (alpha x resize path + (1 - alpha) x mean of the sub-patch embeddings)\n"
          f"- SE: binomial over {n} images; Δ: difference to vanilla on the same images ± paired SE\n"
          f"- run time {secs:.0f} s, {torch.get_num_threads()} CPU threads\n\n{table}\n")
    write_text(out / "start.md", md)
    write_text(out / "start.json", json.dumps(dict(command=command, rows=rows, seconds=secs), indent=1))
    log(f"wrote {out / 'start.md'}, {out / 'start.json'} ({secs:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
