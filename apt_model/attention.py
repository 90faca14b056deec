"""Attention over a packed sequence: every image attends only to its own segment.

Backends (``attn_backend``):
- ``"flash"``: ``flash_attn_varlen_func`` (flash-attn installed, CUDA, fp16/bf16);
- ``"padded"``: segments gathered into a padded ``[B, Lmax]`` batch with a key mask, one SDPA call
  (CUDA without flash-attn, where one big kernel beats many small ones);
- ``"segments"``: one SDPA call per segment, on views (the CPU: fastest measured forward and
  backward, tools/bench_model.py);
- ``"dense"``: one SDPA call with a block-diagonal ``[L, L]`` mask (a slow reference for tests);
- ``"auto"``: flash > padded on CUDA; segments on the CPU.
Segments of equal length (no reduction, same-size images) skip all of this: one batched SDPA call.
Segment lengths come from the batch as Python ints, so no backend syncs with the device.
Trailing padding tokens form their own segment.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F

from .pos_embed import to_device_index

BACKENDS = ("auto", "flash", "padded", "segments", "dense")


@lru_cache(maxsize=1)
def flash_attn_varlen():
    """``flash_attn_varlen_func`` if flash-attn is installed, else None (imported lazily)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:
        return None
    return flash_attn_varlen_func


@dataclass
class PackedContext:
    """Per-forward description of the packed sequence (built once, used by every block)."""

    seqlens: tuple[int, ...]          # image segments, then the padding segment if any
    num_images: int
    total: int                        # sequence length, padding included
    max_seqlen: int
    cu_seqlens: torch.Tensor          # int32 [num_segments + 1] on the device
    segment_ids: torch.Tensor         # int64 [total]: segment of every token
    backend: str
    _pad_index: Optional[tuple] = None

    @classmethod
    def from_batch(cls, batch, device: torch.device, backend: str, dtype: torch.dtype) -> "PackedContext":
        seqlens = tuple(batch.seqlens) + ((batch.num_padding,) if batch.num_padding else ())
        total = sum(seqlens)
        cu = [0]
        for n in seqlens:
            cu.append(cu[-1] + n)
        cu_t = to_device_index(cu, device).to(torch.int32)
        seg = torch.repeat_interleave(to_device_index(range(len(seqlens)), device), to_device_index(seqlens, device),
                                      output_size=total)
        return cls(seqlens=seqlens, num_images=len(batch.seqlens), total=total, max_seqlen=max(seqlens, default=0),
                   cu_seqlens=cu_t, segment_ids=seg, backend=resolve_backend(backend, device, dtype))

    def pad_index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gather index [S, Lmax], key mask [S, 1, 1, Lmax], flat valid index) for the padded backend."""
        if self._pad_index is None:
            S, Lm = len(self.seqlens), self.max_seqlen
            gather, valid, flat = [], [], []
            start = 0
            for s, n in enumerate(self.seqlens):
                gather.extend(range(start, start + n))
                gather.extend([start] * (Lm - n) if n else [0] * Lm)
                valid.extend([1] * n + [0] * (Lm - n))
                flat.extend(range(s * Lm, s * Lm + n))
                start += n
            g = to_device_index(gather, device).view(S, Lm)
            m = to_device_index(valid, device).view(S, 1, 1, Lm).bool()
            self._pad_index = (g, m, to_device_index(flat, device))
        return self._pad_index


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attn_backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "flash":
        if flash_attn_varlen() is None:
            raise RuntimeError("attn_backend='flash' needs flash-attn (pip install 'apt[flash]'), not installed")
        if device.type != "cuda":
            raise RuntimeError("attn_backend='flash' needs CUDA tensors")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        return "flash" if flash_attn_varlen() is not None and dtype in (torch.float16, torch.bfloat16) else "padded"
    return "segments"


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: PackedContext,
                     dropout_p: float = 0.0, scale: Optional[float] = None) -> torch.Tensor:
    """q, k, v ``[H, L, d]`` (head-major, like timm's layout) -> ``[L, H, d]`` (token-major, ready
    for the output projection), attention within segments only."""
    backend = ctx.backend
    if backend == "flash" and q.dtype not in (torch.float16, torch.bfloat16):
        backend = "padded"  # flash kernels are fp16/bf16 only (e.g. fp32 outside autocast)
    if backend == "flash":
        o = flash_attn_varlen()(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), ctx.cu_seqlens,
                                ctx.cu_seqlens, ctx.max_seqlen, ctx.max_seqlen, dropout_p=dropout_p,
                                softmax_scale=scale)
        return o
    H, L, d = q.shape
    if backend in ("padded", "segments") and len(set(ctx.seqlens)) == 1:
        # equal segments (no reduction, same-size images): a plain batch, no gather, no mask
        S, n = len(ctx.seqlens), ctx.seqlens[0]
        qb, kb, vb = (t.reshape(H, S, n, d).transpose(0, 1) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qb, kb, vb, dropout_p=dropout_p, scale=scale)
        return out.transpose(1, 2).reshape(L, H, d)
    if backend == "segments":
        outs, start = [], 0
        for n in ctx.seqlens:
            outs.append(F.scaled_dot_product_attention(q[:, start:start + n], k[:, start:start + n], v[:, start:start + n],
                                                       dropout_p=dropout_p, scale=scale).transpose(0, 1))
            start += n
        return torch.cat(outs) if len(outs) > 1 else outs[0].contiguous()
    if backend == "padded":
        gather, mask, flat = ctx.pad_index(q.device)
        S, Lm = gather.shape
        qp, kp, vp = (t[:, gather].transpose(0, 1) for t in (q, k, v))  # [S, H, Lm, d]
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, dropout_p=dropout_p, scale=scale)
        return out.transpose(1, 2).reshape(S * Lm, H, d)[flat]
    if backend == "dense":
        seg = ctx.segment_ids
        mask = (seg[:, None] == seg[None, :])[None, None]
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, dropout_p=dropout_p, scale=scale)
        return out[0].transpose(0, 1)
    raise ValueError(f"unknown attention backend {backend!r}")


def packed_attention(attn, x: torch.Tensor, ctx: PackedContext) -> torch.Tensor:
    """timm ``Attention.forward`` on a packed ``[L, C]`` sequence (same weights, same maths)."""
    L = x.shape[0]
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(L, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
    q, k, v = qkv.unbind(0)  # [H, L, d]
    q, k = attn.q_norm(q), attn.k_norm(k)
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    o = varlen_attention(q, k, v, ctx, dropout_p=dropout_p, scale=attn.scale)
    o = attn.norm(o.reshape(L, attn.num_heads * attn.head_dim))
    if gate is not None:
        o = o * gate
    return attn.proj_drop(attn.proj(o))


def per_image_drop_path(branch: torch.Tensor, drop_prob: float, scale_by_keep: bool, ctx: PackedContext,
                        training: bool) -> torch.Tensor:
    """DropPath with one keep/drop draw per image (not one for the whole packed batch)."""
    if drop_prob == 0.0 or not training:
        return branch
    keep_prob = 1.0 - drop_prob
    keep = branch.new_empty(len(ctx.seqlens)).bernoulli_(keep_prob)
    if scale_by_keep and keep_prob > 0.0:
        keep = keep / keep_prob
    return branch * keep[ctx.segment_ids].unsqueeze(-1)


def packed_block(blk, x: torch.Tensor, ctx: PackedContext) -> torch.Tensor:
    """timm ``Block.forward`` on a packed sequence, with per-image drop path."""
    dp1, dp2 = blk.drop_path1, blk.drop_path2
    a = blk.ls1(packed_attention(blk.attn, blk.norm1(x), ctx))
    x = x + per_image_drop_path(a, getattr(dp1, "drop_prob", 0.0), getattr(dp1, "scale_by_keep", True), ctx, blk.training)
    m = blk.ls2(blk.mlp(blk.norm2(x)))
    return x + per_image_drop_path(m, getattr(dp2, "drop_prob", 0.0), getattr(dp2, "scale_by_keep", True), ctx, blk.training)
