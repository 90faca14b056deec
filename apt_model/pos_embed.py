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


def resample_grid(pos: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """``[old_h*old_w, D]`` -> ``[new_h*new_w, D]`` (bicubic, antialiased, like timm)."""
    if tuple(old) == tuple(new):
        return pos
    d = pos.shape[-1]
    g = pos.float().reshape(1, old[0], old[1], d).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=new, mode="bicubic", antialias=True, align_corners=False)
    return g.permute(0, 2, 3, 1).reshape(-1, d).to(pos.dtype)


def to_device_index(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """A small int64 tensor built on the host and copied without a blocking host-device sync."""
    t = torch.tensor(list(values), dtype=torch.int64)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


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
        sizes = sorted(set(cells))
        tables, offset, where = [], 0, {}
        for h, w in sizes:
            gs = (-(-h // (1 << s)), -(-w // (1 << s)))
            tables.append(resample_grid(patch_pos, grid_size, gs))
            where[(h, w)] = (offset, gs[1])
            offset += gs[0] * gs[1]
        table = torch.cat(tables) if len(tables) > 1 else tables[0]
        img_off = to_device_index([where[c][0] for c in cells], device)
        img_w = to_device_index([where[c][1] for c in cells], device)
        b = co[:, 0].long()
        idx = img_off[b] + (co[:, 1].long() >> s) * img_w[b] + (co[:, 2].long() >> s)
        out.append(table.index_select(0, idx))
    return out
