"""Decomposed relative-position bias (SAM / MViTv2) for tokens of several sizes.

timm's SAM attention adds ``q . R_h[dy] + q . R_w[dx]`` to the logits, with ``R`` a learnt table per
axis indexed by the query-key offset in cells. Here every token sits at its **centre** in base-cell
units (a scale-s token at cell (y, x): ``y + (2**s - 1) / 2``), so offsets between centres are whole
or half cells; a half-cell offset reads the **linear interpolation** of the two neighbouring table
rows (``q . lerp(R) = lerp(q . R)``, computed on a half-cell grid: one matmul and two gathers). A
large key counts once (no multiplicity term). Exact (timm's values) when every token is base scale;
segments that are their whole grid at base scale use timm's own broadcast computation. Tables are
resized as timm's ``get_rel_pos`` for other grid sizes. Positions are given as twice the centres,
so they stay integers.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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


def rel_pos_bias(attn: nn.Module, q: torch.Tensor, pos_q: torch.Tensor, pos_k: torch.Tensor, grid: tuple[int, int],
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
