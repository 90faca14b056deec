#!/usr/bin/env python
"""Benchmark: APT on timm's SAM ViT image encoder against the original, same real images, same run.

    python benchmarks/bench_sam.py [--source tests/data/images ../shared/data/hires-photos] [--images 8]
                              [--size 1024] [--model samvit_base_patch16] [--depth N] [--thresholds 5.5 4.0]
                              [--batch 1] [--iters 2] [--backend auto] [--skip-no-reduction] [--device cpu]

For each image source: real photos decoded and resized / centre-cropped to ``size`` (timm's eval
transform), packed with window-compatible layouts (`apt_data.windows.pack_windowed`). Prints the
tokens per image (APT vs the uniform grid; the plain quadtree's count, before window
compatibility, beside it), the pad cells every windowed block adds (both models), and the encoder's
images/s (timm ``forward_features`` on normalised floats vs APT ``forward_dense`` from uint8
token pixels: patch embedding, all blocks, the neck), timm and APT alternating, ``--iters`` runs of
each per batch and the fastest counted (CPU timings on a shared machine are noisy);
APT with no reduction (its overhead); the max difference to timm with no reduction; the host-side
packing time per image (scoring, selection, extraction). Random weights (speed does not depend on
them; the rel-pos tables and pos_embed get random values so the parity figure means something).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from apt_data import APTConfig, decode_image, patchify, warmup
from apt_data.windows import pack_windowed, patchify_windowed
from apt_model import from_timm
from bench_common import ROOT

EXTS = (".jpg", ".jpeg", ".png")


def image_paths(source: str, n: int) -> list[Path]:
    paths = sorted(p for p in Path(source).iterdir() if p.suffix.lower() in EXTS)
    if not paths:
        raise SystemExit(f"no images in {source}")
    return paths[:n]


def timm_input(images: list[np.ndarray], model, device) -> torch.Tensor:
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg.get("mean", (0.5,) * 3)).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", (0.5,) * 3)).view(1, 3, 1, 1)
    x = torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1) for i in images]).float() / 255
    return ((x - mean) / std).to(device)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def run_source(args, source: str, model, apt, device) -> dict:
    cfg = APTConfig(patch_size=apt.patch_size, num_scales=apt.num_scales, thresholds=tuple(args.thresholds))
    none = APTConfig(patch_size=apt.patch_size, num_scales=apt.num_scales, thresholds=(-np.inf,) * (apt.num_scales - 1))
    ws = apt.window_size
    paths = image_paths(source, args.images)
    images = [decode_image(p, args.size, crop_pct=1.0) for p in paths]
    groups = [images[i:i + args.batch] for i in range(0, len(images), args.batch)]
    pack_windowed(groups[0], cfg, window=ws)  # warm-up: first-call costs are not packing costs
    t0 = time.perf_counter()
    batches = [pack_windowed(g, cfg, window=ws) for g in groups]
    pack_ms = (time.perf_counter() - t0) * 1e3 / len(images)
    full = [pack_windowed(g, none, window=ws) for g in groups]
    plain_tokens = [len(patchify(im, cfg)) for im in images]
    tokens = [n for b in batches for n in b.seqlens]
    per_scale = np.sum([[t.shape[0] for t in b.pixels] for b in batches], axis=0)
    g = args.size // apt.patch_size
    padded = -(-g // ws) * ws if ws else g
    res = dict(source=source, n=len(images), tokens=float(np.mean(tokens)), plain=float(np.mean(plain_tokens)),
               uniform=g * g, pads=padded * padded - g * g, per_scale=per_scale.tolist(), pack_ms=pack_ms)
    t_timm = t_apt = t_full = 0.0
    err = 0.0
    with torch.inference_mode():
        # warm-up (first calls allocate and pick kernels)
        model.forward_features(timm_input(groups[0], model, device))
        apt.forward_dense(batches[0].to(device))
        if not args.skip_no_reduction:
            apt.forward_dense(full[0].to(device))
        for imgs, b, bf in zip(groups, batches, full):
            x = timm_input(imgs, model, device)
            bd, bfd = b.to(device), bf.to(device)
            out = {}
            ts = [[], [], []]
            for _ in range(args.iters):  # alternating; the least disturbed run of each counts
                ts[0].append(timed(lambda: out.__setitem__("timm", model.forward_features(x)), device))
                ts[1].append(timed(lambda: apt.forward_dense(bd), device))
                if not args.skip_no_reduction:
                    ts[2].append(timed(lambda: out.__setitem__("full", apt.forward_dense(bfd)), device))
            t_timm += min(ts[0])
            t_apt += min(ts[1])
            if not args.skip_no_reduction:
                t_full += min(ts[2])
                err = max(err, (out["full"].float() - out["timm"].float()).abs().max().item())
    n = len(images)
    res.update(timm=n / t_timm, apt=n / t_apt, full=(n / t_full) if t_full else float("nan"), err=err)
    return res


def tokens_table(args) -> None:
    cfg = APTConfig(thresholds=tuple(args.thresholds))
    g = args.size // cfg.patch_size
    print(f"# tokens per image at {args.size} px (uniform grid {g * g}), windows of {args.window} cells, "
          f"thresholds {tuple(args.thresholds)}")
    print("| images | n | tokens/img APT | plain quadtree | kept (APT) | 16/32/64 px tokens | images kept < 70% |")
    print("|---|---|---|---|---|---|---|")
    for src in args.source:
        images = [decode_image(p, args.size, crop_pct=1.0) for p in image_paths(src, args.images)]
        lays = [patchify_windowed(im, cfg, args.window) for im in images]
        plain = [len(patchify(im, cfg)) for im in images]
        n = np.array([len(lay) for lay in lays])
        scales = np.sum([lay.counts() for lay in lays], axis=0) / len(lays)
        print(f"| `{src}` | {len(images)} | {n.mean():.0f} | {np.mean(plain):.0f} | {n.mean() / (g * g):.1%} | "
              f"{'/'.join(f'{v:.0f}' for v in scales)} | {int((n < 0.7 * g * g).sum())} |", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_sources = ["tests/data/images"] + (["../shared/data/hires-photos"]
                                               if (ROOT.parent / "shared/data/hires-photos").is_dir() else [])
    ap.add_argument("--source", nargs="+", default=default_sources, help="image folders (one table row each)")
    ap.add_argument("--images", type=int, default=8, help="images per source")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--model", default="samvit_base_patch16")
    ap.add_argument("--depth", type=int, default=None, help="override the model's depth (quick runs)")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[5.5, 4.0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=2, help="runs per batch and model, alternating; the fastest counts")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-no-reduction", action="store_true", help="skip the APT no-reduction pass")
    ap.add_argument("--tokens-only", action="store_true",
                    help="token counts only (no model; patch 16, 3 scales, --window cells): e.g. --size 1536")
    ap.add_argument("--window", type=int, default=14, help="window size in cells for --tokens-only")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    warmup()
    if args.tokens_only:
        tokens_table(args)
        return
    torch.manual_seed(0)
    import timm

    kw = {} if args.depth is None else {"depth": args.depth}
    model = timm.create_model(args.model, pretrained=False, img_size=args.size, **kw).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name or name == "pos_embed":
                p.normal_(0, 0.5)
    model = model.to(device)
    apt = from_timm(model, attn_backend=args.backend).eval()
    print(f"# {args.model} at {args.size} px, window {apt.window_size} cells, thresholds {tuple(args.thresholds)}, "
          f"batch {args.batch}, best of {args.iters}, {device} ({torch.get_num_threads()} threads), fp32, random weights")
    print("| images | n | tokens/img APT (plain quadtree) | uniform | kept | 16/32/64 px tokens | pad cells/img "
          "| encoder img/s timm | APT | speed-up | APT no reduction | max abs diff no reduction | packing ms/img |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for src in args.source:
        r = run_source(args, src, model, apt, device)
        scales = "/".join(f"{v / r['n']:.0f}" for v in r["per_scale"])
        print(f"| `{src}` | {r['n']} | {r['tokens']:.0f} ({r['plain']:.0f}) | {r['uniform']} | "
              f"{r['tokens'] / r['uniform']:.1%} | {scales} | {r['pads']} | {r['timm']:.3f} | {r['apt']:.3f} | "
              f"{r['apt'] / r['timm']:.2f}x | {r['full']:.3f} | {r['err']:.1e} | {r['pack_ms']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
