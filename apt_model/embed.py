"""The packed input sequence of the APT models: every token's embedding, plus its position, scattered
into its place in the batch's packed order (padding rows stay zero)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from .packed import PackedBatchLike


def check_batch(batch: PackedBatchLike, patch_size: int, num_scales: int) -> None:
    """``ValueError`` unless the batch fits a model of ``patch_size`` and ``num_scales`` and holds images."""
    if batch.patch_size != patch_size:
        raise ValueError(f"batch has patch_size {batch.patch_size}, the model {patch_size}")
    if batch.num_scales > num_scales:
        raise ValueError(f"batch has {batch.num_scales} scales, the model was built for {num_scales}")
    if batch.num_images == 0:
        raise ValueError("empty batch: no images")


def scatter_embeddings(patch_embed: nn.Module, batch: PackedBatchLike, pos: Sequence[Optional[torch.Tensor]],
                       resize_only: bool = False, values: Optional[list] = None,
                       index: Optional[list] = None) -> torch.Tensor:
    """The packed input sequence ``[L, D]``: every scale's patch embeddings (+ ``pos[s]`` where not
    None) and any extra rows (``values`` at ``index``, e.g. prefix tokens) scattered into their
    positions with one ``index_copy``; padding rows stay zero."""
    values, index = list(values or []), list(index or [])
    for s in range(batch.num_scales):
        if batch.pixels[s].shape[0] == 0:
            continue
        e = patch_embed(batch.pixels[s], s, resize_only=resize_only)
        if pos[s] is not None:
            e = e + pos[s].to(e.dtype)
        values.append(e)
        index.append(batch.seq_index[s])
    vals = torch.cat(values) if len(values) > 1 else values[0]
    idx = torch.cat(index) if len(index) > 1 else index[0]
    return vals.new_zeros(batch.seq_len, vals.shape[1]).index_copy(0, idx, vals)
