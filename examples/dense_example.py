#!/usr/bin/env python
"""Dense prediction with APT: a per-pixel head on an APT SAM encoder's dense feature map, trained a
few steps on the sample shards against a synthetic per-pixel target (the image's edge map).

    python examples/dense_example.py [--shards shards] [--steps 20] [--batch 8] [--image-size 448]
                                  [--model samvit_base_patch16] [--embed-dim 192 --depth 4 --heads 3]
                                  [--thresholds 5.5 4.0] [--lr 1e-3] [--seed 0]

The encoder is timm's SAM ViT (random init, reduced width/depth by default so a CPU runs it in
seconds; ``--depth 12 --embed-dim 768 --heads 12 --image-size 1024`` is SAM ViT-B) wrapped by
`from_timm`; batches are packed with window-compatible layouts (`pack_windowed`). Each step:
``model.forward_dense(batch)`` (the neck on the token map `to_dense` rebuilds: a large token is
repeated over the cells it covers) -> a small conv head -> bilinear upsampling to the pixels ->
BCE with the Sobel edge map of the image. The log shows the loss falling, the tokens used, and the
gradient reaching the embedding of every patch scale: repeated tokens receive the sum of their
cells' gradients, so the whole encoder (large-patch detail path included) trains from per-pixel
losses. Held-out loss (val shard) is printed before and after.
"""
from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from apt_data import APTConfig, decode_image
from apt_data.shards import iter_shards
from apt_data.windows import pack_windowed
from apt_model import from_timm

ROOT = Path(__file__).resolve().parents[1]  # the checkout: its sample shards/


def edge_target(images: list[np.ndarray], thresh: float = 0.15) -> torch.Tensor:
    """Synthetic per-pixel target ``[B, 1, H, W]``: 1 where the gray image's Sobel magnitude exceeds
    ``thresh`` (gray in [0, 1])."""
    x = torch.from_numpy(np.stack(images)).float().mean(-1, keepdim=True).permute(0, 3, 1, 2) / 255
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3) / 4
    gx = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kx)
    gy = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kx.transpose(2, 3))
    return ((gx.square() + gy.square()).sqrt() > thresh).float()


class PixelHead(nn.Module):
    """Conv3x3 -> GELU -> Conv1x1 on the ``[B, C, H/p, W/p]`` map, logits upsampled to ``H x W``."""

    def __init__(self, dim: int, hidden: int = 64):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(dim, hidden, 3, padding=1), nn.GELU(), nn.Conv2d(hidden, 1, 1))

    def forward(self, fmap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self.conv(fmap), size=size, mode="bilinear", align_corners=False)


def images_from(pattern: str, size: int):
    for rec in itertools.cycle(list(iter_shards(pattern))):
        yield decode_image(rec.jpeg, size, crop_pct=1.0)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default=str(ROOT / "shards"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--model", default="samvit_base_patch16")
    ap.add_argument("--embed-dim", type=int, default=192)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--thresholds", type=float, nargs="+", default=[5.5, 4.0])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    import timm

    # global attention in every third block and the last one, as SAM (2, 5, 8, 11 of 12)
    glob = tuple(i for i in range(args.depth) if i % 3 == 2 or i == args.depth - 1)
    vit = timm.create_model(args.model, pretrained=False, img_size=args.image_size, embed_dim=args.embed_dim,
                            depth=args.depth, num_heads=args.heads, global_attn_indexes=glob, neck_chans=64)
    model = from_timm(vit).train()
    head = PixelHead(model.num_features)
    cfg = APTConfig(patch_size=model.patch_size, num_scales=model.num_scales, thresholds=tuple(args.thresholds))
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    train = images_from(f"{args.shards}/train-{{000000..000003}}.tar", args.image_size)
    val_images = [im for im, _ in zip(images_from(f"{args.shards}/val-000000.tar", args.image_size), range(args.batch))]
    val_batch, val_target = pack_windowed(val_images, cfg, window=model.window_size), edge_target(val_images)
    size = (args.image_size, args.image_size)
    pos_weight = torch.tensor(3.0)

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            out = F.binary_cross_entropy_with_logits(head(model.forward_dense(val_batch), size), val_target,
                                                     pos_weight=pos_weight).item()
        model.train()
        return out

    g = args.image_size // model.patch_size
    print(f"APT {args.model} (dim {args.embed_dim}, depth {args.depth}, windows of {model.window_size} cells, "
          f"global blocks {glob}) at {args.image_size} px, batch {args.batch}, thresholds {tuple(args.thresholds)}")
    v0 = val_loss()
    print(f"val loss before: {v0:.4f}")
    print("step   loss  tokens/img (uniform)  16/32/64 px tokens  |grad| detail path s=1 / s=2   s/step")
    first = last = None
    for step in range(args.steps):
        images = [next(train) for _ in range(args.batch)]
        batch = pack_windowed(images, cfg, window=model.window_size)
        target = edge_target(images)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(head(model.forward_dense(batch), size), target, pos_weight=pos_weight)
        loss.backward()
        gn = [(lin.weight.grad.norm().item() if lin.weight.grad is not None else 0.0)
              for lin in model.patch_embed.zero_linear]
        opt.step()
        dt = time.perf_counter() - t0
        first = loss.item() if first is None else first
        last = loss.item()
        counts = "/".join(str(t.shape[0]) for t in batch.pixels)
        print(f"{step:4d} {loss.item():.4f}  {np.mean(batch.seqlens):7.1f} ({g * g})  {counts:>18}  "
              + " / ".join(f"{v:.2e}" for v in gn) + f"   {dt:.2f}", flush=True)
    v1 = val_loss()
    print(f"val loss after {args.steps} steps: {v1:.4f} (before {v0:.4f}); train loss {first:.4f} -> {last:.4f}")
    return dict(val_before=v0, val_after=v1, first=first, last=last)


if __name__ == "__main__":
    main()
