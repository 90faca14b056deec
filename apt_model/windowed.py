"""APT for windowed ViTs: timm's ``VisionTransformerSAM`` (the SAM image encoder, ViTDet-style
window attention with a few global blocks, decomposed relative positions, a conv neck).

The packed sequence is the batch's (images one after another, tokens of every scale). Each block
attends within *segments* of it, through the same packed-segment machinery as `APTViT`
(`PackedContext`, the attention backends of `apt_model.attention`):

- **global blocks** (``window_size == 0``): one segment per image, in packed order;
- **windowed blocks**: one segment per (image, window). Windows are ``ws x ws`` base cells laid from
  the image's top-left corner; each holds a variable number of tokens (every token lies inside one
  window: pack with `apt_data.windows.pack_windowed`, else ``ValueError``). As in timm, the image
  grid is padded to a window multiple with zero tokens *after* ``norm1``; those pad cells are
  real keys (and queries whose outputs are dropped) of their window, at base scale, so border
  windows see exactly timm's keys. A window segment is its tokens in packed order, then its pad
  cells; one gather (``[x; 0]`` rows) builds the window-ordered qkv, one ``index_select`` takes the
  outputs back.

Both segmentations (lengths, gathers, positions) are planned on the host from the batch's CPU
coordinates (`WindowedViTPlan`), then copied to the device without a blocking transfer.

**Relative positions** (decomposed, as SAM/MViTv2: ``q . R_h[dy] + q . R_w[dx]`` added to the
logits): every token sits at its **centre** in base-cell units (a scale-s token at cell (y, x):
``y + (2**s - 1) / 2``), window-local in windowed blocks, image-global in global blocks. Offsets
between centres are whole or half cells; a half-cell offset reads the **linear interpolation** of
the two neighbouring table rows (``q . lerp(R) = lerp(q . R)``, computed on a half-cell grid).
A large token counts once as a key (no multiplicity term), as in APT's global attention. Exact
(timm's values) when every token is base scale; tables are resized as timm's ``get_rel_pos``.
**Absolute positions**: `gather_pos_embed`, as `APTViT` (scale s reads the table resampled to the
scale-s grid).

Attention with a relative-position bias cannot use ``varlen_attention`` (no bias argument, and
flash-attn's varlen kernel takes none): the same backends are mirrored here with a bias —
``segments`` (one SDPA call per segment), ``padded`` (segments bucketed by length, each bucket
padded to its longest with the key mask folded into the bias, one SDPA call per bucket; ``flash``
and ``dense`` take it too) — and segments of equal length with one table (no reduction) make one
batched call, the call timm makes. With ``attn_backend="auto"`` windows take ``padded`` on every
device (a few batched calls instead of one per window, far less sensitive to a busy CPU) and
images what "auto" resolves to (``segments`` on the CPU). Models without relative positions call
``varlen_attention`` itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import PackedContext, resolve_backend, varlen_attention
from .backbone import APTBackbone
from .dense import to_dense
from .packed import compute_dtype, host_to_device
from .pos_embed import gather_pos_embed
from .vit import scatter_embeddings

# ----------------------------------------------------------------------------------- planning


@dataclass
class SegmentPlan:
    """One segmentation of the packed sequence for attention, as host-side arrays.

    ``seqlens``: segment lengths of the (gathered) attention sequence, images or windows first,
    then the batch's padding tokens as their own segment if any. ``gather``: int64 ``[Lw]`` row of
    ``[x; 0]`` feeding every slot (row ``L`` is the zero row of pad cells); None = the packed order.
    ``slots``: int64 ``[L]`` slot of every packed row. ``pos``: int64 ``[Lw, 2]`` twice the
    token centre (y, x) in base cells, segment-local. ``grids``: the relative-position grid (h, w) of
    every segment (None for the padding segment). ``full``: the segment is its whole grid at base
    scale in raster order (timm's computation applies as is). ``row_segment``: int64 ``[L]`` segment
    of every packed row (drop path draws).
    """

    seqlens: tuple[int, ...]
    num_real: int
    grids: tuple[Optional[tuple[int, int]], ...]
    full: tuple[bool, ...]
    pos: np.ndarray
    row_segment: np.ndarray
    gather: Optional[np.ndarray] = None
    slots: Optional[np.ndarray] = None
    _dev: dict = field(default_factory=dict, repr=False)

    @property
    def total(self) -> int:
        return int(sum(self.seqlens))

    @property
    def equal(self) -> bool:
        """All segments of one length and one relative-position grid: one batched attention call."""
        return len(set(self.seqlens)) == 1 and len(set(self.grids)) == 1 and self.grids[0] is not None

    def tensors(self, device: torch.device) -> dict:
        """The index arrays on ``device`` (copied once per device, without a blocking transfer)."""
        device = torch.device(device)
        if device not in self._dev:
            def mv(a):
                return None if a is None else host_to_device(torch.from_numpy(np.ascontiguousarray(a)), device)
            self._dev[device] = dict(pos=mv(self.pos), row_segment=mv(self.row_segment), gather=mv(self.gather),
                                     slots=mv(self.slots))
        return self._dev[device]

    def buckets(self, H: int) -> list:
        """Host-side plan of the ``padded`` path: segments of one rel-pos grid, sorted by length and
        grouped so a bucket's shortest segment is >= 4/5 of its longest (whole-grid segments apart:
        timm's computation), each bucket padded to its longest (a multiple of 8), in chunks whose
        ``[S, H, Lm, Lm]`` bias stays <= 2^26 elements. Returns ``(buckets, slot)``: per bucket
        (segment ids, Lm, grid, full, gather ``[S*Lm]``, key mask ``[S, Lm]``), and ``slot`` ``[Lw]``,
        the row of every slot in the concatenated bucket outputs."""
        key = ("buckets", H)
        if key in self._dev:
            return self._dev[key]
        lens = np.asarray(self.seqlens, np.int64)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        order = sorted(range(len(lens)), key=lambda i: (str(self.grids[i]), self.full[i], -lens[i]))
        groups, cur = [], []
        for i in order:
            if cur and (self.grids[i] != self.grids[cur[0]] or self.full[i] != self.full[cur[0]]
                        or 5 * lens[i] < 4 * lens[cur[0]]):
                groups.append(cur)
                cur = []
            cur.append(i)
        groups.append(cur)
        out, slot, done = [], np.empty(self.total, np.int64), 0
        for g in groups:
            Lm = int(lens[g[0]]) if self.full[g[0]] else -(-int(lens[g[0]]) // 8) * 8
            step = max(1, (1 << 26) // (H * Lm * Lm))
            for a in range(0, len(g), step):
                ids = np.asarray(g[a:a + step], np.int64)
                j = np.arange(Lm)
                n = lens[ids]
                gather = starts[ids, None] + np.minimum(j[None], n[:, None] - 1)
                mask = j[None] < n[:, None]
                for r, i in enumerate(ids):  # where each segment's rows land in the outputs
                    slot[starts[i]:starts[i] + lens[i]] = done + r * Lm + np.arange(lens[i])
                out.append((ids, Lm, self.grids[ids[0]], bool(self.full[ids[0]]), gather.reshape(-1), mask))
                done += len(ids) * Lm
        self._dev[key] = (out, slot)
        return out, slot

    def context(self, device: torch.device, backend: str) -> PackedContext:
        # padded segments: a multiple of 8 slots, so the padded bias rows stay aligned for the fused
        # (memory-efficient) SDPA kernels on CUDA
        m = max(self.seqlens)
        m = m if backend == "segments" else -(-m // 8) * 8
        return PackedContext(seqlens=self.seqlens, num_images=self.num_real, total=self.total, max_seqlen=m,
                             device=torch.device(device), backend=backend)


@dataclass
class WindowedViTPlan:
    """Segmentations of one packed batch: ``segments[0]`` global (per image), ``segments[ws]`` the
    ``ws``-cell windows. Built on the host by `APTWindowedViT.plan`; reusable for the batch on any device."""

    segments: dict
    seq_len: int


def _token_table(batch) -> tuple[np.ndarray, ...]:
    """(image, y, x, cells, packed row) of every patch token, all scales, from the CPU coords."""
    bs, ys, xs, fs, rows = [], [], [], [], []
    for s in range(batch.num_scales):
        co = batch.coords[s]
        if co.shape[0] == 0:
            continue
        co = co.detach().cpu().numpy().astype(np.int64)  # host tensors: no copy, no sync
        bs.append(co[:, 0])
        ys.append(co[:, 1])
        xs.append(co[:, 2])
        fs.append(np.full(co.shape[0], 1 << s, np.int64))
        rows.append(batch.seq_index[s].detach().cpu().numpy().astype(np.int64))
    return tuple(np.concatenate(a) for a in (bs, ys, xs, fs, rows))


def _image_grids(batch) -> list[tuple[int, int]]:
    p = batch.patch_size
    return [(h // p, w // p) for h, w in batch.image_sizes]


def plan_global(batch) -> SegmentPlan:
    """Global blocks: one segment per image (+ the padding segment), packed order, image-global centres."""
    b, y, x, f, rows = _token_table(batch)
    L = batch.seq_len
    pos = np.zeros((L, 2), np.int64)
    pos[rows, 0] = 2 * y + f - 1
    pos[rows, 1] = 2 * x + f - 1
    seqlens = tuple(int(n) for n in batch.seqlens) + ((int(batch.num_padding),) if batch.num_padding else ())
    grids = tuple(_image_grids(batch)) + ((None,) if batch.num_padding else ())
    full = tuple(g is not None and n == g[0] * g[1] for n, g in zip(seqlens, grids))  # all base scale: raster
    row_segment = np.repeat(np.arange(len(seqlens)), seqlens)
    return SegmentPlan(seqlens=seqlens, num_real=batch.num_images, grids=grids, full=full, pos=pos,
                       row_segment=row_segment)


def plan_windows(batch, window: int) -> SegmentPlan:
    """Windowed blocks: one segment per (image, window) of ``window`` x ``window`` base cells, in
    image then window raster order; inside a window its tokens and pad cells (the grid padded to a
    window multiple, as timm) in raster order of their top-left cells. Raises ``ValueError`` for a
    token that crosses a window border."""
    ws = int(window)
    b, y, x, f, rows = _token_table(batch)
    bad = ((y % ws) + f > ws) | ((x % ws) + f > ws)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{int(bad.sum())} token(s) cross a border of the {ws}x{ws}-cell attention windows (first: image "
            f"{b[i]}, a {f[i]}x{f[i]}-cell token at cell ({y[i]}, {x[i]})); pack windowed batches with "
            f"apt_data.windows.pack_windowed(images, cfg, window={ws}) (or split_for_windows on the layouts)")
    grids = _image_grids(batch)
    nwh = np.array([-(-h // ws) for h, _ in grids], np.int64)
    nww = np.array([-(-w // ws) for _, w in grids], np.int64)
    woff = np.concatenate([[0], np.cumsum(nwh * nww)])
    nwin = int(woff[-1])
    L = batch.seq_len
    # real tokens
    wid = [woff[b] + (y // ws) * nww[b] + x // ws]
    py, px = [2 * (y % ws) + f - 1], [2 * (x % ws) + f - 1]
    src, key = [rows], [(y % ws) * ws + x % ws]
    # pad cells of every image: the padded grid outside the image, zero rows
    for i, (h, w) in enumerate(grids):
        H, W = int(nwh[i]) * ws, int(nww[i]) * ws
        if H * W == h * w:
            continue
        cy, cx = np.nonzero(np.pad(np.zeros((h, w), bool), ((0, H - h), (0, W - w)), constant_values=True))
        wid.append(woff[i] + (cy // ws) * nww[i] + cx // ws)
        py.append(2 * (cy % ws))
        px.append(2 * (cx % ws))
        src.append(np.full(len(cy), L, np.int64))
        key.append((cy % ws) * ws + cx % ws)
    if batch.num_padding:  # the batch's padding tokens: their own trailing segment
        r = np.arange(L - batch.num_padding, L, dtype=np.int64)
        wid.append(np.full(len(r), nwin, np.int64))
        py.append(np.zeros(len(r), np.int64))
        px.append(np.zeros(len(r), np.int64))
        src.append(r)
        key.append(r)
    wid, py, px, src, key = (np.concatenate(a).astype(np.int64) for a in (wid, py, px, src, key))
    order = np.lexsort((key, wid))
    gather = src[order]
    nseg = nwin + (1 if batch.num_padding else 0)
    seqlens = tuple(int(n) for n in np.bincount(wid, minlength=nseg))
    real = gather < L
    slots = np.empty(L, np.int64)
    slots[gather[real]] = np.nonzero(real)[0]
    row_segment = np.empty(L, np.int64)
    row_segment[gather[real]] = wid[order][real]
    pos = np.stack([py[order], px[order]], 1)
    grids_seg = ((ws, ws),) * nwin + ((None,) if batch.num_padding else ())
    full = tuple(n == ws * ws for n in seqlens[:nwin]) + ((False,) if batch.num_padding else ())
    return SegmentPlan(seqlens=seqlens, num_real=nwin, grids=grids_seg, full=full, pos=pos,
                       row_segment=row_segment, gather=gather, slots=slots)


# ---------------------------------------------------------------------------- relative positions


def rel_pos_table(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """timm's ``get_rel_pos`` table for a ``size``-long axis: ``[2*size-1, d]`` (linearly resized if the
    stored table has another length)."""
    n = 2 * size - 1
    if rel_pos.shape[0] == n:
        return rel_pos
    r = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=n, mode="linear")
    return r.reshape(-1, n).permute(1, 0)


def half_cell_table(table: torch.Tensor) -> torch.Tensor:
    """``[T, d]`` -> ``[2T-1, d]``: the table rows at even entries, the means of neighbours between
    them (linear interpolation at half-cell offsets)."""
    if table.shape[0] < 2:
        return table
    mid = 0.5 * (table[:-1] + table[1:])
    return torch.cat([torch.stack([table[:-1], mid], 1).flatten(0, 1), table[-1:]])


def axis_bias(q: torch.Tensor, table: torch.Tensor, pq: torch.Tensor, pk: torch.Tensor, size: int) -> torch.Tensor:
    """``q . R[c_q - c_k + size - 1]`` for every (query, key) pair, linearly interpolated at half cells.

    q ``[S, H, n, d]``; table ``[2*size-1, d]``; pq ``[S, n]``, pk ``[S, m]``: twice the centres
    (0 .. 2*(size-1)). Returns ``[S, H, n, m]``.
    """
    S, H, n, _ = q.shape
    m = pk.shape[1]
    P = torch.matmul(q, half_cell_table(table).t().to(q.dtype))              # [S, H, n, 4*size-3]
    R = 2 * size - 1                                                         # key centres on the half grid
    idx = pq[:, :, None] - torch.arange(R, device=q.device)[None, None, :] + 2 * (size - 1)   # [S, n, R]
    A = P.gather(-1, idx[:, None].expand(S, H, n, R))                         # A[..., i, r]: key centre r
    return A.gather(-1, pk[:, None, None, :].expand(S, H, n, m))


def grid_axis_bias(q: torch.Tensor, table: torch.Tensor, size: int, axis: int, grid: tuple[int, int]) -> torch.Tensor:
    """timm's decomposed term for queries and keys that are a whole ``grid`` in raster order:
    ``[S, H, gh, gw, size]`` (``size`` = the grid's extent along ``axis``)."""
    S, H, n, d = q.shape
    r = torch.arange(size, device=q.device)
    rel = table.to(q.dtype)[(r[:, None] - r[None, :]) + size - 1]             # [size, size, d] (get_rel_pos)
    rq = q.reshape(S * H, grid[0], grid[1], d)
    eq = "bhwc,hkc->bhwk" if axis == 0 else "bhwc,wkc->bhwk"
    return torch.einsum(eq, rq, rel).view(S, H, grid[0], grid[1], size)


def rel_pos_bias(attn, q: torch.Tensor, pos_q: torch.Tensor, pos_k: torch.Tensor, grid: tuple[int, int],
                 full_grid: bool = False) -> torch.Tensor:
    """Decomposed relative-position bias ``[S, H, n, m]`` of timm's SAM ``Attention`` for tokens at
    ``pos`` (``[S, n, 2]``, twice the centres) on a ``grid`` (h, w) of base cells. ``full_grid``: the
    queries and keys are the whole grid in raster order (all base scale): timm's own computation."""
    gh, gw = grid
    th, tw = rel_pos_table(attn.rel_pos_h, gh), rel_pos_table(attn.rel_pos_w, gw)
    if full_grid:
        S, H, n, _ = q.shape
        bh = grid_axis_bias(q, th, gh, 0, grid)
        bw = grid_axis_bias(q, tw, gw, 1, grid)
        return (bh[..., :, None] + bw[..., None, :]).reshape(S, H, n, n)
    bias = axis_bias(q, th, pos_q[..., 0], pos_k[..., 0], gh)
    return bias.add_(axis_bias(q, tw, pos_q[..., 1], pos_k[..., 1], gw))


def _host_to(a: np.ndarray, device: torch.device, cache: dict, key) -> torch.Tensor:
    """A host index array on ``device``, copied once (non-blocking from pinned memory on CUDA)."""
    key = (key, torch.device(device))
    if key not in cache:
        cache[key] = host_to_device(torch.from_numpy(np.ascontiguousarray(a)), device)
    return cache[key]


def biased_segment_attention(attn, q, k, v, seg: SegmentPlan, ctx: PackedContext, pos: torch.Tensor,
                             dropout_p: float) -> torch.Tensor:
    """Attention with SAM's relative-position bias within every segment: q, k, v ``[Lw, H, d]`` ->
    ``[Lw, H, d]`` (backends as ``varlen_attention``; see the module docstring)."""
    Lw, H, d = q.shape
    if seg.equal:
        S, n = len(seg.seqlens), seg.seqlens[0]
        q4, k4, v4 = (t.view(S, n, H, d).transpose(1, 2) for t in (q, k, v))
        p = pos.view(S, n, 2)
        # bound the [S, H, n, n] bias: chunks of segments (no reduction at 1024 px: 25 windows per image)
        step = max(1, (1 << 26) // max(1, H * n * n))
        outs = []
        for a in range(0, S, step):
            sl = slice(a, a + step)
            bias = rel_pos_bias(attn, q4[sl], p[sl], p[sl], seg.grids[0], all(seg.full))
            outs.append(F.scaled_dot_product_attention(q4[sl], k4[sl], v4[sl], attn_mask=bias, dropout_p=dropout_p))
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        return out.transpose(1, 2).reshape(Lw, H, d)
    if ctx.backend != "segments":
        buckets, slot = seg.buckets(H)
        dev = q.device
        outs = []
        for ids, Lm, grid, full, gather, mask in buckets:
            S = len(ids)
            g = _host_to(gather, dev, seg._dev, ("g", id(gather)))
            q4, k4, v4 = (t.index_select(0, g).view(S, Lm, H, d).transpose(1, 2) for t in (q, k, v))
            bias = None
            if grid is not None:
                p = pos.index_select(0, g).view(S, Lm, 2)
                bias = rel_pos_bias(attn, q4, p, p, grid, full)
            if not mask.all():
                m = _host_to(mask, dev, seg._dev, ("m", id(mask))).view(S, 1, 1, Lm)
                bias = (q4.new_zeros(S, 1, 1, Lm) if bias is None else bias).masked_fill(~m, float("-inf"))
            outs.append(F.scaled_dot_product_attention(q4, k4, v4, attn_mask=bias, dropout_p=dropout_p)
                        .transpose(1, 2).reshape(S * Lm, H, d))
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        return out.index_select(0, _host_to(slot, dev, seg._dev, ("slot", H)))
    outs = []
    for qs, ks, vs, ps, grid, full in zip(q.split(seg.seqlens), k.split(seg.seqlens), v.split(seg.seqlens),
                                          pos.split(seg.seqlens), seg.grids, seg.full):
        q4, k4, v4 = (t.transpose(0, 1)[None] for t in (qs, ks, vs))  # [1, H, n, d]
        bias = None if grid is None else rel_pos_bias(attn, q4, ps[None], ps[None], grid, full)
        outs.append(F.scaled_dot_product_attention(q4, k4, v4, attn_mask=bias, dropout_p=dropout_p)[0].transpose(0, 1))
    return torch.cat(outs)


# ------------------------------------------------------------------------------------- blocks


def _drop_path(branch: torch.Tensor, dp: nn.Module, row_segment: torch.Tensor, num_segments: int,
               training: bool) -> torch.Tensor:
    """timm's DropPath with one draw per segment (a window in windowed blocks, an image otherwise:
    what a timm SAM block draws per sample of its ``[B*windows, ...]`` or ``[B, ...]`` input)."""
    p = getattr(dp, "drop_prob", 0.0)
    if p == 0.0 or not training:
        return branch
    keep = branch.new_empty(num_segments).bernoulli_(1.0 - p)
    if getattr(dp, "scale_by_keep", True) and p < 1.0:
        keep = keep / (1.0 - p)
    return branch * keep[row_segment].unsqueeze(-1)


def sam_attention(attn, x: torch.Tensor, seg: SegmentPlan, ctx: PackedContext) -> torch.Tensor:
    """timm SAM ``Attention.forward`` on the packed ``[L, D]`` (already ``norm1``-ed) sequence, within
    the segments of ``seg``; windowed segments get their pad cells (zero inputs) as extra rows."""
    L, D = x.shape
    H, d = attn.num_heads, attn.head_dim
    t = seg.tensors(x.device)
    qkv = attn.qkv(x)
    if t["gather"] is not None:  # pad cells: qkv of a zero input (the bias), as timm's F.pad after norm1
        qkv = torch.cat([qkv, attn.qkv(x.new_zeros(1, D))]).index_select(0, t["gather"])
    Lw = qkv.shape[0]
    qkv = qkv.view(Lw, 3, H, d)
    q, k, v = qkv.unbind(1)
    if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
        q, k = attn.q_norm(q), attn.k_norm(k)
        qkv = torch.stack((q, k, v), dim=1)
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    if attn.use_rel_pos:
        o = biased_segment_attention(attn, q, k, v, seg, ctx, t["pos"], dropout_p)
    else:
        o = varlen_attention(qkv, ctx, dropout_p=dropout_p, scale=attn.scale)
    if t["slots"] is not None:
        o = o.index_select(0, t["slots"])
    return attn.proj_drop(attn.proj(o.reshape(L, H * d)))


def sam_block(blk, x: torch.Tensor, seg: SegmentPlan, ctx: PackedContext, img: SegmentPlan) -> torch.Tensor:
    """timm SAM ``Block.forward`` on a packed sequence: attention within ``seg`` (windows or images),
    drop path per window / per image as timm draws it."""
    t = seg.tensors(x.device)
    a = blk.ls1(sam_attention(blk.attn, blk.norm1(x), seg, ctx))
    x = x + _drop_path(a, blk.drop_path1, t["row_segment"], len(seg.seqlens), blk.training)
    m = blk.ls2(blk.mlp(blk.norm2(x)))
    return x + _drop_path(m, blk.drop_path2, img.tensors(x.device)["row_segment"], len(img.seqlens), blk.training)


# -------------------------------------------------------------------------------------- model


def check_sam_supported(model: nn.Module) -> None:
    from timm.models.vision_transformer_sam import Attention, Block, VisionTransformerSAM

    if not isinstance(model, VisionTransformerSAM):
        raise TypeError(f"expected a timm VisionTransformerSAM, got {type(model).__name__}")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise TypeError(f"block {i} is {type(blk).__name__}; APT supports timm SAM's Block/Attention")
        if blk.attn.rope is not None:
            raise TypeError("SAM/ViTDet models with rotary embeddings (use_rope=True) are not supported by APT yet")
    pp = getattr(model, "patch_drop", None)
    if pp is not None and not isinstance(pp, nn.Identity):
        raise TypeError("patch dropout is not supported by APT models")
    pe = model.patch_embed
    if getattr(pe, "flatten", False) or tuple(pe.patch_size) != (pe.patch_size[0],) * 2:
        raise TypeError("APT needs a square NHWC patch embedding")


class APTWindowedViT(APTBackbone):
    """A timm ``VisionTransformerSAM`` (windowed + global blocks, conv neck) running packed APT batches.

    Args as `APTViT`. The timm modules (patch projection, ``pos_embed``, blocks with their
    relative-position tables, ``neck``, ``head``) are shared, not copied; the parameter names are
    timm's plus ``patch_embed.down.*`` / ``patch_embed.zero_linear.*``.

    ``forward_features(batch) -> (tokens [L, D], cu_seqlens)``: the packed output of the last block
    (SAM has no final norm: the neck normalises). ``forward_dense(batch) -> [B, C, H/p, W/p]``: what
    timm's ``forward_features`` returns (the neck on the dense map `to_dense` rebuilds; a list for
    images of different sizes). ``forward(batch)``: the head on that map. Batches must be packed
    with ``num_prefix_tokens=0`` and windows of ``model.window_size`` cells
    (`apt_data.windows.pack_windowed`).
    """

    def __init__(self, vit: nn.Module, num_scales: int = 3, attn_backend: str = "auto",
                 mean: Optional[tuple] = None, std: Optional[tuple] = None):
        check_sam_supported(vit)
        super().__init__(vit, num_scales, attn_backend, mean, std,
                         adopt=("pos_embed", "pos_drop", "norm_pre", "blocks", "neck", "head"))
        # pos_embed: [1, gh, gw, D] or None
        self.embed_dim = int(vit.embed_dim)
        self.num_features = int(vit.num_features)
        self.num_prefix_tokens = 0

    @property
    def window_sizes(self) -> tuple[int, ...]:
        """The window size (base cells) of every block; 0 = global attention."""
        return tuple(int(blk.window_size) for blk in self.blocks)

    @property
    def window_size(self) -> int:
        """The window size of the windowed blocks (the ``window`` to pack batches with); 0 if none."""
        sizes = sorted({w for w in self.window_sizes if w > 0})
        if len(sizes) > 1:
            raise ValueError(f"blocks use several window sizes {sizes}")
        return sizes[0] if sizes else 0

    # ------------------------------------------------------------------ planning
    def plan(self, batch) -> WindowedViTPlan:
        """Host-side segmentations of ``batch`` for every block type (call it before ``batch.to(device)``
        to keep a CUDA forward free of host-device syncs; `forward` builds it otherwise)."""
        if batch.num_prefix_tokens != 0:
            raise ValueError(f"SAM models have no class token: pack with num_prefix_tokens=0, got "
                             f"{batch.num_prefix_tokens}")
        segs = {0: plan_global(batch)}
        for w in set(self.window_sizes) - {0}:
            segs[w] = plan_windows(batch, w)
        return WindowedViTPlan(segments=segs, seq_len=batch.seq_len)

    # ------------------------------------------------------------------ embedding
    def embed(self, batch) -> torch.Tensor:
        """Packed input sequence ``[L, D]``: patch embeddings + absolute positions, zero padding rows."""
        if batch.patch_size != self.patch_size:
            raise ValueError(f"batch has patch_size {batch.patch_size}, the model {self.patch_size}")
        if batch.num_scales > self.num_scales:
            raise ValueError(f"batch has {batch.num_scales} scales, the model was built for {self.num_scales}")
        if batch.num_images == 0:
            raise ValueError("empty batch: no images")
        pos = [None] * batch.num_scales
        if self.pos_embed is not None:
            patch_pos = self.pos_embed[0].reshape(-1, self.pos_embed.shape[-1])
            pos = gather_pos_embed(patch_pos, self.grid_size, batch.coords, batch.image_sizes, self.patch_size)
        x = scatter_embeddings(self.patch_embed, batch, pos, self.resize_only)
        return self.norm_pre(self.pos_drop(x))

    # ------------------------------------------------------------------ forward
    def forward_features(self, batch, plan: Optional[WindowedViTPlan] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed tokens ``[L, D]`` after the last block, and the batch's ``cu_seqlens``."""
        plan = plan or self.plan(batch)
        if plan.seq_len != batch.seq_len:
            raise ValueError("the plan was made for another batch")
        x = self.embed(batch)
        backend = resolve_backend(self.attn_backend, x.device, compute_dtype(x.device, x.dtype))  # as APTViT.context
        img = plan.segments[0]
        # windows: many short segments, so "auto" takes the bucketed padded path (a few batched calls)
        # on every device; images: the backend "auto" resolves to (one call per image on the CPU)
        wback = "padded" if self.attn_backend == "auto" else backend
        ctxs = {w: seg.context(x.device, wback if w else backend) for w, seg in plan.segments.items()}
        for blk in self.blocks:
            w = int(blk.window_size)
            if w not in plan.segments:
                raise ValueError(f"the plan has no {w}-cell windows (made for another model?)")
            args = (blk, x, plan.segments[w], ctxs[w], img)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(sam_block, *args, use_reentrant=False)
            else:
                x = sam_block(*args)
        return x, batch.cu_seqlens

    def forward_dense(self, batch, plan: Optional[WindowedViTPlan] = None):
        """The dense feature map timm's ``forward_features`` returns: ``neck(to_dense(tokens))``,
        ``[B, C, H/p, W/p]`` (a list of ``[C, H_b/p, W_b/p]`` for images of different sizes)."""
        x, _ = self.forward_features(batch, plan)
        dense = to_dense(x, batch)
        if isinstance(dense, list):
            return [self.neck(m[None])[0] for m in dense]
        return self.neck(dense)

    def forward_head(self, dense, pre_logits: bool = False) -> torch.Tensor:
        """timm's head (pooling over the dense map) -> ``[B, num_classes]``."""
        if isinstance(dense, list):
            return torch.cat([self.head(m[None], pre_logits=pre_logits) for m in dense])
        return self.head(dense, pre_logits=pre_logits)

    def forward(self, batch, plan: Optional[WindowedViTPlan] = None) -> torch.Tensor:
        return self.forward_head(self.forward_dense(batch, plan))

    # ------------------------------------------------------------------ helpers
    def no_weight_decay(self) -> set:
        return {"pos_embed"}

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^pos_embed|^patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^neck", (99999,))])


__all__ = ["APTWindowedViT", "WindowedViTPlan", "SegmentPlan", "plan_global", "plan_windows", "rel_pos_bias",
           "rel_pos_table", "axis_bias", "biased_segment_attention", "check_sam_supported"]
