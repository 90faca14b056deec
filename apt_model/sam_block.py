"""timm's SAM ``Block`` and ``Attention`` (windowed or global, with decomposed relative positions) on a
packed sequence, within the segments of a `SegmentPlan`.

Same modules, same maths as timm; only the attention call changes. Attention with the
relative-position bias cannot go through `varlen_attention` (no bias argument, and flash-attn's
varlen kernel takes none), so `biased_segment_attention` runs the SDPA layouts of
`apt_model.attention` with the bias as their additive mask:

- segments of one length and one grid (no reduction): `sdpa_equal`, the batched call timm makes
  (in chunks bounding the ``[S, H, n, n]`` bias);
- ``segments`` backend: `sdpa_segments`, one call per segment;
- every other backend (``padded``, and ``flash`` / ``varlen`` / ``dense``, which take no bias):
  segments bucketed by length (`SegmentPlan.buckets`), each bucket one `sdpa_padded` call with the
  key mask folded into the bias.

Models without relative positions call `varlen_attention` itself (every backend).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .attention import PackedContext, sdpa_equal, sdpa_padded, sdpa_segments, varlen_attention
from .drop_path import block_drop_path
from .rel_pos import rel_pos_bias
from .window_plan import SegmentPlan

_MAX_BIAS = 1 << 26  # elements of one [S, H, n, n] bias in the batched equal-segment path


def biased_segment_attention(attn: nn.Module, qkv: torch.Tensor, seg: SegmentPlan, ctx: PackedContext,
                             pos: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """SAM attention with its relative-position bias within every segment of ``seg``: ``qkv``
    ``[Lw, 3, H, d]`` in segment order -> ``[Lw, H, d]``. ``pos``: ``[Lw, 2]`` twice the token
    centres (segment-local). The scale is SDPA's default, as timm's SAM ``Attention``."""
    H = qkv.shape[2]
    if seg.equal:
        S, n = len(seg.seqlens), seg.seqlens[0]
        p = pos.view(S, n, 2)
        grid, full = seg.grids[0], all(seg.full)

        def equal_bias(q: torch.Tensor, sl: slice) -> torch.Tensor:
            return rel_pos_bias(attn, q, p[sl], p[sl], grid, full)

        return sdpa_equal(qkv, S, dropout_p, mask=equal_bias, chunk=max(1, _MAX_BIAS // max(1, H * n * n)))
    if ctx.backend == "segments":
        ps = pos.split(list(seg.seqlens))

        def segment_bias(i: int, q: torch.Tensor) -> Optional[torch.Tensor]:
            grid = seg.grids[i]
            if grid is None:
                return None
            return rel_pos_bias(attn, q, ps[i][None], ps[i][None], grid, seg.full[i])

        return sdpa_segments(qkv, seg.seqlens, dropout_p, mask=segment_bias)
    buckets, slot = seg.buckets(H)
    dev = qkv.device
    outs = []
    for j, b in enumerate(buckets):
        S, Lm = len(b.segments), b.length
        g = seg.on_device(("bucket", H, j, "gather"), b.gather, dev)

        def bucket_bias(q: torch.Tensor, b=b, g=g, S=S, Lm=Lm, j=j) -> Optional[torch.Tensor]:
            bias = None
            if b.grid is not None:
                p = pos.index_select(0, g).view(S, Lm, 2)
                bias = rel_pos_bias(attn, q, p, p, b.grid, b.full)
            if not b.mask.all():
                m = seg.on_device(("bucket", H, j, "mask"), b.mask, dev).view(S, 1, 1, Lm)
                bias = (q.new_zeros(S, 1, 1, Lm) if bias is None else bias).masked_fill(~m, float("-inf"))
            return bias

        outs.append(sdpa_padded(qkv, g, S, Lm, dropout_p, mask=bucket_bias))
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    return out.index_select(0, seg.on_device(("bucket", H, "slot"), slot, dev))


def sam_attention(attn: nn.Module, x: torch.Tensor, seg: SegmentPlan, ctx: PackedContext) -> torch.Tensor:
    """timm SAM ``Attention.forward`` on the packed ``[L, D]`` (already ``norm1``-ed) sequence, within
    the segments of ``seg``; windowed segments get their pad cells (zero inputs) as extra rows."""
    L, D = x.shape
    H, d = attn.num_heads, attn.head_dim
    t = seg.tensors(x.device)
    qkv = attn.qkv(x)
    if t["gather"] is not None:  # pad cells: qkv of a zero input (the bias), as timm's F.pad after norm1
        qkv = torch.cat([qkv, attn.qkv(x.new_zeros(1, D))]).index_select(0, t["gather"])
    qkv = qkv.view(qkv.shape[0], 3, H, d)
    if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
        q, k, v = qkv.unbind(1)
        qkv = torch.stack((attn.q_norm(q), attn.k_norm(k), v), dim=1)
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    if attn.use_rel_pos:
        o = biased_segment_attention(attn, qkv, seg, ctx, t["pos"], dropout_p)
    else:
        o = varlen_attention(qkv, ctx, dropout_p=dropout_p, scale=attn.scale)
    if t["slots"] is not None:
        o = o.index_select(0, t["slots"])
    return attn.proj_drop(attn.proj(o.reshape(L, H * d)))


def sam_block(blk: nn.Module, x: torch.Tensor, seg: SegmentPlan, ctx: PackedContext, img: SegmentPlan) -> torch.Tensor:
    """timm SAM ``Block.forward`` on a packed sequence: attention within ``seg`` (windows or images),
    drop path drawn per segment of ``seg`` after attention and per image (``img``) after the MLP, as
    timm draws it per sample of its ``[B*windows, ...]`` / ``[B, ...]`` inputs."""
    dev = x.device
    a = blk.ls1(sam_attention(blk.attn, blk.norm1(x), seg, ctx))
    x = x + block_drop_path(a, blk.drop_path1, lambda: seg.on_device("row_segment", seg.row_segment, dev),
                            len(seg.seqlens), blk.training)
    m = blk.ls2(blk.mlp(blk.norm2(x)))
    return x + block_drop_path(m, blk.drop_path2, lambda: img.on_device("row_segment", img.row_segment, dev),
                               len(img.seqlens), blk.training)
