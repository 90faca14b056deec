"""Drop path (stochastic depth) drawn once per segment of a packed sequence, for every APT model.

timm's ``DropPath`` draws keep/drop once per sample of its input. A packed sequence is one "sample"
holding many images, so drawing once for it would drop or keep the whole batch together; here one
draw is made per segment instead: per image in `APTViT` and in global blocks, per window in the
windowed blocks of `APTWindowedViT` (what timm's SAM block draws per sample of its
``[B*windows, ...]`` input). Same distribution and scaling as timm's ``drop_path``.
"""
from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn as nn

SegmentIds = Union[torch.Tensor, Callable[[], torch.Tensor]]


def segment_drop_path(branch: torch.Tensor, segment_ids: SegmentIds, num_segments: int, drop_prob: float,
                      scale_by_keep: bool = True, training: bool = True) -> torch.Tensor:
    """``branch`` ``[L, ...]`` with every segment kept (scaled by ``1/keep_prob`` with
    ``scale_by_keep``) or zeroed as a whole, one Bernoulli draw per segment.

    ``segment_ids``: int64 ``[L]``, the segment (``0..num_segments-1``) of every row, or a function
    returning it (called only when a draw is made, so eval mode builds nothing).
    """
    if drop_prob == 0.0 or not training:
        return branch
    keep_prob = 1.0 - drop_prob
    keep = branch.new_empty(num_segments).bernoulli_(keep_prob)
    if scale_by_keep and keep_prob > 0.0:
        keep = keep / keep_prob
    seg = segment_ids() if callable(segment_ids) else segment_ids
    return branch * keep[seg].unsqueeze(-1)


def block_drop_path(branch: torch.Tensor, dp: nn.Module, segment_ids: SegmentIds, num_segments: int,
                    training: bool) -> torch.Tensor:
    """`segment_drop_path` with the settings of a timm block's ``drop_path`` module (``DropPath`` or
    ``Identity``: no drop)."""
    return segment_drop_path(branch, segment_ids, num_segments, getattr(dp, "drop_prob", 0.0),
                             getattr(dp, "scale_by_keep", True), training)
