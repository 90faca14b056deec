"""Analytic FLOPs of an APT ViT on a packed batch (multiply-adds x 2).

Counted: the patch embedding (base GEMM per token; for a scale-s token the resized-patch GEMM and,
unless ``resize_only``, the 4**s sub-patch GEMMs, the 2x2 down convs and the zero linear), and per
block qkv, attention (``QK^T`` and ``AV``: ``4 n^2 D``), projection and MLP. Norms, activations,
softmax and the head are left out (they are <1% of a ViT). Padding tokens are not counted: the
figures are per real image. The same formula with no large patches is the plain timm ViT's.
"""
from __future__ import annotations

from typing import Optional


def _blocks_flops(seqlens, D: int, hidden: int, depth: int, attention: bool = True) -> float:
    """qkv + projection + MLP per token, and ``4 n^2 D`` attention per sequence, over all blocks."""
    tokens = sum(seqlens)
    flops = depth * 2 * tokens * (4 * D * D + 2 * D * hidden)
    if attention:
        flops += depth * 4 * sum(n * n for n in seqlens) * D
    return float(flops)


def timm_vit_flops(model, n_images: int, patch_tokens: int, attention: bool = True) -> float:
    """The same count for a plain timm ViT (or an `APTViT` on the uniform grid): ``n_images`` images of
    ``patch_tokens`` uniform patches each."""
    D = model.embed_dim
    hidden = model.blocks[0].mlp.fc1.out_features
    p = model.patch_embed.patch_size
    p = p[0] if isinstance(p, (tuple, list)) else int(p)  # timm: (p, p); an APTViT's embedding: p
    n = patch_tokens + model.num_prefix_tokens
    per = _blocks_flops([n], D, hidden, len(model.blocks), attention) + patch_tokens * 2 * 3 * p * p * D
    return float(n_images * per)


def vit_flops(batch, model, resize_only: Optional[bool] = None, attention: bool = True) -> float:
    """Encoder FLOPs of ``model`` (an `APTViT`) on ``batch`` (a `PackedBatch`, read by duck typing).

    ``resize_only`` defaults to ``model.resize_only`` (the detail path is then not computed).
    ``attention=False`` leaves out the ``4 n^2 D`` attention products (for comparing with op counters
    that do not see fused attention kernels).
    """
    resize_only = bool(getattr(model, "resize_only", False)) if resize_only is None else bool(resize_only)
    D = model.embed_dim
    hidden = model.blocks[0].mlp.fc1.out_features
    depth = len(model.blocks)
    p = model.patch_size
    flops = _blocks_flops(batch.seqlens, D, hidden, depth, attention)
    gemm = 2 * 3 * p * p * D  # one base patch through E
    for s, pix in enumerate(batch.pixels):
        t = int(pix.shape[0])
        flops += t * gemm  # E(P) at scale 0, E(Resize_p(P)) above
        if s > 0 and not resize_only:
            flops += t * (4 ** s) * gemm  # E on every sub-patch
            flops += t * sum(4 ** (s - l - 1) for l in range(s)) * 2 * 4 * D * D  # the 2x2 down convs
            flops += t * 2 * D * D  # the zero linear
    return float(flops)
