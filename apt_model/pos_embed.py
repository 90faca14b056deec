"""Absolute positional embeddings for tokens of several sizes, on images of any size.

Scale 0 uses the pretrained grid resampled to the image's base grid (as timm does for
``dynamic_img_size``: bicubic, antialiased; untouched when the sizes match, so a no-reduction APT
model is exactly the timm model). Scale s uses the pretrained grid resampled to the scale-s grid
``ceil(h / 2**s) x ceil(w / 2**s)`` (h, w in base cells); a scale-s token at base cell (y, x)
reads entry ``(y >> s, x >> s)``. Grids are computed once per forward for each (image size, scale)
present and gathered; nothing loops over tokens.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .packed import device_index


def resample_grid(pos: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """``[old_h*old_w, D]`` -> ``[new_h*new_w, D]`` (bicubic, antialiased, like timm)."""
    if tuple(old) == tuple(new):
        return pos
    d = pos.shape[-1]
    g = pos.float().reshape(1, old[0], old[1], d).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=new, mode="bicubic", antialias=True, align_corners=False)
    return g.permute(0, 2, 3, 1).reshape(-1, d).to(pos.dtype)


def gather_pos_embed(patch_pos: torch.Tensor, grid_size: tuple[int, int], coords: Sequence[torch.Tensor],
                     image_sizes: Sequence[tuple[int, int]], patch_size: int) -> list[Optional[torch.Tensor]]:
    """Positional embedding of every token: one ``[T_s, D]`` tensor per scale."""
    device = patch_pos.device
    cells = [(h // patch_size, w // patch_size) for h, w in image_sizes]
    out: list[Optional[torch.Tensor]] = []
    for s, co in enumerate(coords):
        if co.shape[0] == 0:
            out.append(None)
            continue
        grids = [(-(-h // (1 << s)), -(-w // (1 << s))) for h, w in cells]  # scale-s grid of every image
        tables, offset, where = [], 0, {}
        for gs in sorted(set(grids)):  # one resampled table per distinct grid
            tables.append(resample_grid(patch_pos, grid_size, gs))
            where[gs] = offset
            offset += gs[0] * gs[1]
        table = torch.cat(tables) if len(tables) > 1 else tables[0]
        img_off = device_index([where[gs] for gs in grids], device)
        img_w = device_index([gs[1] for gs in grids], device)
        b = co[:, 0].long()
        idx = img_off[b] + (co[:, 1].long() >> s) * img_w[b] + (co[:, 2].long() >> s)
        out.append(table.index_select(0, idx))
    return out
