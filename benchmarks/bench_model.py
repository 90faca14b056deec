#!/usr/bin/env python
"""Benchmark: APT ViT against the original timm ViT, same real images, same run, same machine.

    python benchmarks/bench_model.py [--models vit_small_patch16_224 vit_base_patch16_224] [--sizes 224 384]
                                [--batch 8] [--iters 3] [--thresholds 5.5 4.0] [--device cpu]
                                [--dtype float32|bfloat16] [--backend auto] [--skip-train] [--attention]

For each model and size: tokens per image (APT vs the uniform grid), inference and train-step
(forward + backward + SGD step) images/s of APT and timm, their ratio, the ratio the FLOPs
predict, and the speed of APT with no reduction (thresholds -inf) against timm (its overhead).
Models have random weights (no downloads); speed does not depend on the weights. Images are the
shipped real photos (tests/data/images), resized and centre-cropped to each size.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from apt_data import APTConfig, decode_image, pack_images, warmup
from apt_model import PackedContext, from_timm, varlen_attention
from apt_train.flops import timm_vit_flops, vit_flops
from bench_common import ROOT


def timed(fns: list, iters: int, warm: int = 1, repeat: int = 1) -> list[float]:
    """Median seconds per call of each function; the functions alternate inside every iteration, so
    a change in background load hits all of them alike. ``repeat`` back-to-back calls per timing
    (synchronised only around them) measure a GPU's steady state, where the host launches the next
    call while the device still runs the last one, as in a serving or training loop."""
    cuda = torch.cuda.is_available()
    for fn in fns:
        for _ in range(warm):
            fn()
    ts = [[] for _ in fns]
    for _ in range(iters):
        for k, fn in enumerate(fns):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(repeat):
                fn()
            if cuda:
                torch.cuda.synchronize()
            ts[k].append((time.perf_counter() - t0) / repeat)
    return [float(np.median(t)) for t in ts]


def attention_table(args, dev: torch.device, paths: list) -> None:
    """Attention alone, every backend, on the real packed batches' segment lengths (all blocks of the
    model): what ``attn_backend="auto"`` is chosen from."""
    import timm

    backends = ["segments", "padded", "dense"] + (["varlen", "flash"] if dev.type == "cuda" else [])
    print(f"\n# attention backends: {args.batch} real photos packed, all blocks, {args.dtype}, median of {args.iters}")
    print("| model | size | tokens | max seqlen | " + " | ".join(f"{b} fwd ms | {b} fwd+bwd ms" for b in backends) + " |")
    print("|---|---|---|---|" + "---|---|" * len(backends))
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    for name in args.models:
        for size in args.sizes:
            model = timm.create_model(name, pretrained=False, img_size=size)
            p = model.patch_embed.patch_size[0]
            imgs = [decode_image(paths[i % len(paths)], size, multiple=p) for i in range(args.batch)]  # cycles past 32
            batch = pack_images(imgs, APTConfig(patch_size=p, thresholds=tuple(args.thresholds)),
                                num_prefix_tokens=model.num_prefix_tokens)
            attn, depth = model.blocks[0].attn, len(model.blocks)
            L = batch.seq_len
            qkv = torch.randn(L, 3, attn.num_heads, attn.head_dim, device=dev, dtype=dtype, requires_grad=True)
            cells = []
            for backend in backends:
                if backend == "dense" and L > 16384:  # an [L, L] mask: tens of GB at this size
                    cells += ["n/a", "n/a"]
                    continue
                try:
                    ctx = PackedContext.from_batch(batch, dev, backend, dtype)
                except RuntimeError as e:  # flash-attn not installed
                    cells += ["n/a", "n/a"]
                    print(f"# {backend}: {e}", file=sys.stderr)
                    continue

                def fwd():
                    with torch.no_grad():
                        for _ in range(depth):
                            varlen_attention(qkv, ctx, scale=attn.scale)

                def fwd_bwd():
                    for _ in range(depth):
                        varlen_attention(qkv * 1, ctx, scale=attn.scale).sum().backward()

                t_f, t_b = timed([fwd, fwd_bwd], args.iters, repeat=args.repeat)
                cells += [f"{t_f * 1e3:.1f}", f"{t_b * 1e3:.1f}"]
            print(f"| {name} | {size} | {batch.num_real_tokens} | {batch.max_seqlen} | " + " | ".join(cells) + " |",
                  flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 384])
    ap.add_argument("--batch", type=int, default=8, help="images per step")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=None,
                    help="back-to-back calls per timing (default 5 on CUDA, 1 on the CPU)")
    ap.add_argument("--thresholds", type=float, nargs=2, default=[5.5, 4.0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--backend", default="auto", help="APT attention backend for the main table")
    ap.add_argument("--attention", action="store_true",
                    help="also time the attention backends alone on the same packed batches")
    args = ap.parse_args(argv)
    if args.repeat is None:
        args.repeat = 5 if str(args.device).startswith("cuda") else 1
    import timm

    warmup()
    dev = torch.device(args.device)
    amp = args.dtype == "bfloat16"
    paths = sorted((ROOT / "tests" / "data" / "images").glob("*.JPEG"))
    print(f"# bench_model: {args.batch} real photos per step, device {dev} ({torch.get_num_threads()} CPU threads), "
          f"{args.dtype}, median of {args.iters} timings of {args.repeat} back-to-back calls")
    print("| model | size | tokens/img APT (uniform) | infer img/s timm | APT | ratio | FLOP ratio | ratio / FLOP ratio "
          "| train img/s timm | APT | ratio | no-reduction infer / train vs timm |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for size in args.sizes:
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False, img_size=size, num_classes=1000).to(dev)
            apt = from_timm(model, attn_backend=args.backend)
            p = apt.patch_size
            imgs = [decode_image(paths[i % len(paths)], size, multiple=p) for i in range(args.batch)]  # cycles past 32
            cfg = APTConfig(patch_size=p, thresholds=tuple(args.thresholds))
            batch = pack_images(imgs, cfg, labels=list(range(len(imgs))), num_prefix_tokens=apt.num_prefix_tokens).to(dev)
            full = pack_images(imgs, APTConfig(patch_size=p, thresholds=(-np.inf, -np.inf)), labels=list(range(len(imgs))),
                               num_prefix_tokens=apt.num_prefix_tokens).to(dev)
            mean = torch.tensor(model.pretrained_cfg["mean"], device=dev).view(1, 3, 1, 1)
            std = torch.tensor(model.pretrained_cfg["std"], device=dev).view(1, 3, 1, 1)
            x = (torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1) for i in imgs]).to(dev).float() / 255 - mean) / std
            y = batch.labels
            n_img = len(imgs)
            uniform = (size // p) ** 2
            apt_tok = (batch.num_real_tokens - n_img * apt.num_prefix_tokens) / n_img
            ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if amp else torch.autocast(dev.type, enabled=False)

            def infer(fn):
                def run():
                    with torch.no_grad(), ctx:
                        fn()
                return run

            def train(fn):
                params = [q for q in model.parameters()] + apt.apt_parameters()
                opt = torch.optim.SGD(params, lr=1e-6)

                def run():
                    with ctx:
                        loss = torch.nn.functional.cross_entropy(fn(), y)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                return run

            model.eval()
            apt.eval()
            t_timm, t_apt, t_full = timed([infer(lambda: model(x)), infer(lambda: apt(batch)),
                                           infer(lambda: apt(full))], args.iters, repeat=args.repeat)
            flop_ratio = timm_vit_flops(model, n_img, uniform) / vit_flops(batch, apt)
            row = (f"| {name} | {size} | {apt_tok:.0f} ({uniform}) | {n_img / t_timm:.2f} | {n_img / t_apt:.2f} | "
                   f"{t_timm / t_apt:.3f} | {flop_ratio:.3f} | {t_timm / t_apt / flop_ratio:.2f} | ")
            if args.skip_train:
                row += f"- | - | - | {t_timm / t_full:.3f} / - |"
            else:
                model.train()
                apt.train()
                tt_timm, tt_apt, tt_full = timed([train(lambda: model(x)), train(lambda: apt(batch)),
                                                  train(lambda: apt(full))], args.iters, repeat=args.repeat)
                row += (f"{n_img / tt_timm:.2f} | {n_img / tt_apt:.2f} | {tt_timm / tt_apt:.3f} | "
                        f"{t_timm / t_full:.3f} / {tt_timm / tt_full:.3f} |")
            print(row, flush=True)
    if args.attention:
        attention_table(args, dev, paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
