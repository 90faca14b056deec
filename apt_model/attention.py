"""Attention over a packed sequence: every token attends only within its own segment.

Backends (``attn_backend``):

- ``"flash"``: ``flash_attn_varlen_qkvpacked_func`` (flash-attn installed, CUDA, fp16/bf16);
- ``"varlen"``: PyTorch's own flash-attention varlen kernel (``torch.nn.attention.varlen.varlen_attn``,
  PyTorch >= 2.9, CUDA, fp16/bf16, no attention dropout): flash-attn's speed without installing it;
- ``"padded"``: segments gathered into a padded ``[S, H, Lmax, d]`` batch with a key mask, one SDPA
  call (CUDA without flash-attn: one big kernel beats many small ones);
- ``"segments"``: one SDPA call per segment, on ``torch.split`` views of the packed qkv (the CPU: the
  fastest forward and train step there, see docs/model.md);
- ``"dense"``: one SDPA call with a block-diagonal ``[L, L]`` mask (quadratic in the whole batch; a
  reference for tests);
- ``"auto"``: flash > varlen > padded on CUDA (padded for fp32, where no flash kernel runs), segments
  on the CPU.

Segments of equal length (no reduction, same-size images) skip all of this: one batched SDPA call,
the same call timm makes. Segment lengths come from the batch as Python ints and every index
tensor is built from them, so no backend reads a device tensor back (no host-device sync).
Trailing padding tokens form their own segment.

The three SDPA layouts (`sdpa_equal`, `sdpa_segments`, `sdpa_padded`) take an optional additive
mask per call, so attention with a bias (the windowed models' relative positions,
`apt_model.sam_block`) runs through the same code.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .drop_path import block_drop_path
from .packed import PackedBatchLike, device_index, segment_ids, segment_starts

BACKENDS = ("auto", "flash", "varlen", "padded", "segments", "dense")
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


@lru_cache(maxsize=None)
def optional_import(module: str, name: str) -> Optional[Any]:
    """``module.name`` if it can be imported, else None (imported lazily, once)."""
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:
        return None


def flash_attn_varlen() -> Optional[Callable]:
    """``flash_attn_varlen_qkvpacked_func`` if flash-attn is installed, else None."""
    return optional_import("flash_attn", "flash_attn_varlen_qkvpacked_func")


def torch_varlen() -> Optional[Callable]:
    """PyTorch's ``varlen_attn`` (cu_seqlens flash attention, PyTorch >= 2.9) or None."""
    return optional_import("torch.nn.attention.varlen", "varlen_attn")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend ``"auto"`` stands for on this device and dtype (explicit ones are checked)."""
    if backend not in BACKENDS:
        raise ValueError(f"attn_backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "flash":
        if flash_attn_varlen() is None:
            raise RuntimeError("attn_backend='flash' needs flash-attn (pip install 'apt[flash]'), not installed")
        if device.type != "cuda":
            raise RuntimeError("attn_backend='flash' needs CUDA tensors")
    if backend == "varlen":
        if torch_varlen() is None:
            raise RuntimeError(f"attn_backend='varlen' needs torch.nn.attention.varlen (PyTorch >= 2.9), "
                               f"this is {torch.__version__}")
        if device.type != "cuda":
            raise RuntimeError("attn_backend='varlen' needs CUDA tensors")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        if flash_attn_varlen() is not None and dtype in _FLASH_DTYPES:
            return "flash"
        return "varlen" if torch_varlen() is not None and dtype in _FLASH_DTYPES else "padded"
    return "segments"


@dataclass
class PackedContext:
    """Per-forward description of the packed sequence, built once from the batch's Python ints and
    shared by every block. Device index tensors (``segment_ids``, ``cu_seqlens``, the padded
    backend's gathers) are built lazily, each once, without a blocking host-device copy."""

    seqlens: tuple[int, ...]          # image segments, then the padding segment if any
    num_images: int
    total: int                        # sequence length, padding included
    max_seqlen: int
    device: torch.device
    backend: str
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_batch(cls, batch: PackedBatchLike, device: torch.device, backend: str = "auto",
                   dtype: torch.dtype = torch.float32) -> "PackedContext":
        """The context of a packed batch: one segment per image (``batch.seqlens``), then the
        ``batch.num_padding`` padding tokens as their own segment."""
        seqlens = tuple(int(n) for n in batch.seqlens) + ((int(batch.num_padding),) if batch.num_padding else ())
        return cls(seqlens=seqlens, num_images=len(batch.seqlens), total=sum(seqlens),
                   max_seqlen=max(seqlens, default=0), device=torch.device(device),
                   backend=resolve_backend(backend, torch.device(device), dtype))

    @property
    def num_segments(self) -> int:
        return len(self.seqlens)

    def _cached(self, key: str, make: Callable):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def segment_ids(self) -> torch.Tensor:
        """int64 ``[total]``: segment of every token (images 0..B-1, then padding)."""
        return self._cached("seg", lambda: segment_ids(self.seqlens, self.device))

    @property
    def cu_seqlens(self) -> torch.Tensor:
        """int32 ``[num_segments + 1]`` on the device: segment ``i`` is rows ``cu_seqlens[i]:cu_seqlens[i+1]``,
        the padding segment included (what the varlen kernels take)."""
        return self._cached("cu", lambda: device_index(segment_starts(self.seqlens) + [self.total],
                                                       self.device).to(torch.int32))

    def pad_index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the padded backend: (gather ``[S*Lmax]`` packed row of every padded slot, key mask
        ``[S, 1, 1, Lmax]``, ``[total]`` padded slot of every packed row)."""
        def make():
            S, Lm = len(self.seqlens), self.max_seqlen
            lens = device_index(self.seqlens, self.device)
            starts = torch.cumsum(lens, 0) - lens
            j = torch.arange(Lm, device=self.device)
            last = (lens - 1).clamp(min=0)
            gather = (starts[:, None] + torch.minimum(j[None], last[:, None])).clamp(max=self.total - 1)
            mask = (j[None] < lens[:, None]).view(S, 1, 1, Lm)
            seg = self.segment_ids
            slot = seg * Lm + torch.arange(self.total, device=self.device) - starts[seg]
            return gather.reshape(-1), mask, slot
        return self._cached("pad", make)


# --------------------------------------------------------------------- SDPA layouts of a packed qkv
# qkv is timm's layout, token-major: [L, 3, H, d]; outputs are [L, H, d] in the same row order.

MaskFn = Callable[..., Optional[torch.Tensor]]


def sdpa_equal(qkv: torch.Tensor, num_segments: int, dropout_p: float = 0.0, scale: Optional[float] = None,
               mask: Optional[MaskFn] = None, chunk: Optional[int] = None) -> torch.Tensor:
    """Segments of one length as a plain batch ``[S, H, n, d]``: one SDPA call, no gather. With
    ``chunk``, one call per ``chunk`` segments. ``mask(q, segments)``: the additive mask of the
    queries ``q`` ``[s, H, n, d]`` of ``segments`` (a slice), or None."""
    L, _, H, d = qkv.shape
    S = num_segments
    q, k, v = qkv.view(S, L // S, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    if mask is None and chunk is None:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    else:
        step = S if chunk is None else max(1, int(chunk))
        outs = []
        for a in range(0, S, step):
            sl = slice(a, a + step)
            m = None if mask is None else mask(q[sl], sl)
            outs.append(F.scaled_dot_product_attention(q[sl], k[sl], v[sl], attn_mask=m, dropout_p=dropout_p,
                                                       scale=scale))
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
    return out.transpose(1, 2).reshape(L, H, d)


def sdpa_segments(qkv: torch.Tensor, seqlens: Sequence[int], dropout_p: float = 0.0, scale: Optional[float] = None,
                  mask: Optional[MaskFn] = None) -> torch.Tensor:
    """One SDPA call per segment. ``mask(i, q)``: the additive mask ``[1, H, n, n]`` of segment ``i``'s
    queries ``q`` ``[1, H, n, d]``, or None."""
    outs = []
    for i, chunk in enumerate(qkv.split(list(seqlens))):  # split, not slicing: its backward is one cat
        q, k, v = chunk.permute(1, 2, 0, 3).unbind(0)  # [H, n, d]
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
        else:
            q, k, v = q[None], k[None], v[None]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask(i, q), dropout_p=dropout_p, scale=scale)[0]
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


def sdpa_padded(qkv: torch.Tensor, gather: torch.Tensor, num_segments: int, length: int, dropout_p: float = 0.0,
                scale: Optional[float] = None, mask: Union[None, torch.Tensor, MaskFn] = None) -> torch.Tensor:
    """Rows ``gather`` (``[S*Lm]``) of ``qkv`` as a padded batch ``[S, H, Lm, d]``, one SDPA call ->
    ``[S*Lm, H, d]`` in slot order. ``mask``: a tensor, or a function of the queries ``[S, H, Lm, d]``
    returning one (e.g. a bias with the key mask folded in), or None."""
    _, _, H, d = qkv.shape
    S, Lm = num_segments, length
    q, k, v = qkv.index_select(0, gather).view(S, Lm, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    if callable(mask):
        mask = mask(q)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2).reshape(S * Lm, H, d)


def _torch_varlen_call(qkv: torch.Tensor, ctx: PackedContext, scale: Optional[float]) -> torch.Tensor:
    q, k, v = qkv.unbind(1)  # [L, H, d] each
    d = qkv.shape[-1]
    if scale is not None and abs(scale - d ** -0.5) > 1e-12:
        q = q * (scale * d ** 0.5)  # the kernel's default scale is d**-0.5; fold any other into q
    return torch_varlen()(q, k, v, ctx.cu_seqlens, ctx.cu_seqlens, ctx.max_seqlen, ctx.max_seqlen)


def varlen_attention(qkv: torch.Tensor, ctx: PackedContext, dropout_p: float = 0.0,
                     scale: Optional[float] = None) -> torch.Tensor:
    """Packed ``qkv`` ``[L, 3, H, d]`` (timm's qkv layout, token-major) -> ``[L, H, d]``, each token
    attending only within its segment."""
    backend = ctx.backend
    if backend in ("flash", "varlen") and qkv.dtype not in _FLASH_DTYPES:
        backend = "padded"  # flash kernels are fp16/bf16 only (e.g. fp32 outside autocast)
    if backend == "varlen" and dropout_p > 0.0:
        backend = "padded"  # PyTorch's varlen kernel has no attention dropout
    if backend == "flash":
        return flash_attn_varlen()(qkv, ctx.cu_seqlens, ctx.max_seqlen, dropout_p=dropout_p, softmax_scale=scale)
    if backend == "varlen":
        return _torch_varlen_call(qkv, ctx, scale)
    if len(set(ctx.seqlens)) == 1 and backend != "dense":
        # equal segments (no reduction, same-size images): a plain batch, no gather, no mask
        return sdpa_equal(qkv, len(ctx.seqlens), dropout_p, scale)
    if backend == "segments":
        return sdpa_segments(qkv, ctx.seqlens, dropout_p, scale)
    if backend == "padded":
        gather, mask, slot = ctx.pad_index()
        out = sdpa_padded(qkv, gather, len(ctx.seqlens), ctx.max_seqlen, dropout_p, scale, mask)
        return out.index_select(0, slot)
    if backend == "dense":
        seg = ctx.segment_ids
        mask = (seg[:, None] == seg[None, :])[None]
        q, k, v = qkv.permute(1, 2, 0, 3).unbind(0)  # [H, L, d]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
        return out.transpose(0, 1)
    raise ValueError(f"unknown attention backend {backend!r}")


# ------------------------------------------------------------------------- timm blocks, packed


def packed_attention(attn: nn.Module, x: torch.Tensor, ctx: PackedContext) -> torch.Tensor:
    """timm ``Attention.forward`` on a packed ``[L, C]`` sequence (same modules, same maths)."""
    L = x.shape[0]
    H, d = attn.num_heads, attn.head_dim
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).view(L, 3, H, d)
    if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
        q, k, v = qkv.unbind(1)
        qkv = torch.stack((attn.q_norm(q), attn.k_norm(k), v), dim=1)
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    o = varlen_attention(qkv, ctx, dropout_p=dropout_p, scale=attn.scale)
    o = attn.norm(o.reshape(L, H * d))
    if gate is not None:
        o = o * gate
    return attn.proj_drop(attn.proj(o))


def packed_block(blk: nn.Module, x: torch.Tensor, ctx: PackedContext) -> torch.Tensor:
    """timm ``Block.forward`` on a packed sequence, with drop path drawn once per image (segment)."""
    def seg():
        return ctx.segment_ids

    a = blk.ls1(packed_attention(blk.attn, blk.norm1(x), ctx))
    x = x + block_drop_path(a, blk.drop_path1, seg, ctx.num_segments, blk.training)
    m = blk.ls2(blk.mlp(blk.norm2(x)))
    return x + block_drop_path(m, blk.drop_path2, seg, ctx.num_segments, blk.training)
