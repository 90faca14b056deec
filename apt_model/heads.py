"""Segmentation heads on an APT model's dense feature map (`forward_dense`).

`LinearSegHead` is DINOv2's linear protocol: (optional) BatchNorm and a 1x1 convolution on the patch
features, logits upsampled bilinearly to the mask. `SegmentationModel` puts a backbone and a head
together, so a packed batch goes to per-pixel logits in one call; large tokens reach the head repeated
over the cells they cover (`to_dense`), so every pixel has a feature whatever the layout.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .packed import PackedBatchLike

Size = tuple[int, int]


def upsample_logits(logits: torch.Tensor, size: Size) -> torch.Tensor:
    """``[B, K, h, w]`` -> ``[B, K, H, W]``, bilinear (align_corners=False, as mmseg's ``resize``)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


class LinearSegHead(nn.Module):
    """Per-cell linear classifier of a ``[B, C, h, w]`` feature map (DINOv2's linear protocol).

    Args:
        in_dim: feature channels (the backbone's ``num_features``).
        num_classes: output classes (the ignore value is not a class).
        batch_norm: a BatchNorm2d before the classifier (DINOv2's ``linear`` head has one).
        dropout: channel dropout before the classifier (0: none).
    """

    def __init__(self, in_dim: int, num_classes: int, batch_norm: bool = True, dropout: float = 0.0):
        super().__init__()
        self.num_classes = int(num_classes)
        self.norm = nn.BatchNorm2d(in_dim) if batch_norm else nn.Identity()
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(in_dim, num_classes, kernel_size=1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, fmap: torch.Tensor, size: Optional[Size] = None) -> torch.Tensor:
        """Logits ``[B, K, h, w]``, upsampled to ``size`` (H, W) when given."""
        logits = self.classifier(self.drop(self.norm(fmap)))
        return logits if size is None else upsample_logits(logits, size)


class SegmentationModel(nn.Module):
    """An APT backbone (anything with ``forward_dense``) and a head on its dense feature map.

    ``forward(batch, sizes)`` returns logits at the masks' sizes: one ``[B, K, H, W]`` tensor when every
    image (and mask) has one size, else a list of ``[K, H_b, W_b]``. ``sizes`` defaults to the images'
    own sizes. A lower-resolution input with a full-size mask is the lower-resolution baseline: the
    logits are upsampled to the mask.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward_features(self, batch: PackedBatchLike) -> Union[torch.Tensor, list[torch.Tensor]]:
        return self.backbone.forward_dense(batch)

    def forward(self, batch: PackedBatchLike, sizes: Optional[Sequence[Size]] = None
                ) -> Union[torch.Tensor, list[torch.Tensor]]:
        fmap = self.forward_features(batch)
        sizes = [tuple(s) for s in (sizes if sizes is not None else batch.image_sizes)]
        if isinstance(fmap, torch.Tensor) and len(set(sizes)) == 1:
            return self.head(fmap, sizes[0])
        maps = list(fmap) if isinstance(fmap, torch.Tensor) else fmap
        return [self.head(m[None], s)[0] for m, s in zip(maps, sizes)]

    def no_weight_decay(self) -> set:
        return {f"backbone.{n}" for n in getattr(self.backbone, "no_weight_decay", lambda: set())()}
