"""`to_dense`: a packed token sequence back to a dense ``[B, D, H/p, W/p]`` feature map.

Each token is repeated over the base cells it covers (a scale-s token over 2^s x 2^s cells), as
dense-prediction heads expect, with one scatter per scale; nothing loops over tokens.
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn as nn

from .packed import PackedBatchLike, device_index


def to_dense(tokens: torch.Tensor, batch: PackedBatchLike) -> Union[torch.Tensor, list[torch.Tensor]]:
    """Packed tokens ``[L, D]`` or ``[1, L, D]`` (e.g. `APTViT.forward_features`) -> ``[B, D, H/p, W/p]``.

    Prefix and padding tokens are left out. Images of different sizes give a list of
    ``[D, H_b/p, W_b/p]`` maps instead (no padding to a common size is invented).
    """
    if tokens.dim() == 3 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.dim() != 2 or tokens.shape[0] != batch.seq_len:
        raise ValueError(f"expected packed tokens [{batch.seq_len}, D], got {tuple(tokens.shape)}")
    p = batch.patch_size
    cells = [(h // p, w // p) for h, w in batch.image_sizes]
    offsets, total = [], 0
    for h, w in cells:
        offsets.append(total)
        total += h * w
    dev = tokens.device
    off_t = device_index(offsets, dev)
    width_t = device_index([w for _, w in cells], dev)
    out = tokens.new_zeros(total, tokens.shape[1])
    for s in range(batch.num_scales):
        co = batch.coords[s]
        if co.shape[0] == 0:
            continue
        f = 1 << s
        d = torch.arange(f, device=dev)
        b, y, x = co[:, 0].long(), co[:, 1].long(), co[:, 2].long()
        rows = y[:, None, None] + d[None, :, None]                    # [T, f, 1]
        cols = x[:, None, None] + d[None, None, :]                    # [T, 1, f]
        cell = off_t[b][:, None, None] + rows * width_t[b][:, None, None] + cols  # [T, f, f]
        vals = tokens.index_select(0, batch.seq_index[s]).unsqueeze(1).expand(-1, f * f, -1)
        out = out.index_copy(0, cell.reshape(-1), vals.reshape(-1, tokens.shape[1]))
    maps = [m.reshape(h, w, -1).permute(2, 0, 1) for m, (h, w) in zip(out.split([h * w for h, w in cells]), cells)]
    if len(set(cells)) == 1:
        return torch.stack(maps)
    return maps


def dense_features(model: nn.Module, batch: PackedBatchLike) -> Union[torch.Tensor, list[torch.Tensor]]:
    """The dense feature map of any APT model, ``[B, C, H/p, W/p]`` (a list for mixed image sizes):
    ``model.forward_dense(batch)`` (`APTWindowedViT`: the SAM neck's output, what timm's
    ``forward_features`` returns; `APTViT`: timm's ``forward_features`` patch tokens on their grid)."""
    return model.forward_dense(batch)
