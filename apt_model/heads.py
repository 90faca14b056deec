"""Segmentation heads on an APT model's dense feature map (`forward_dense`).

`LinearSegHead` is DINOv2's linear protocol: (optional) BatchNorm and a 1x1 convolution on the patch
features, logits upsampled bilinearly to the mask. `ConvSegHead` is a light decoder: a 1x1 projection and
two 3x3 convolutions before the classifier, so a large token (repeated over the cells it covers) is
corrected by its neighbours' features near its block's edges instead of giving one constant prediction
over its whole block. `SegmentationModel` puts a backbone and a head together, so a packed batch goes to
per-pixel logits in one call; large tokens reach the head repeated over the cells they cover
(`to_dense`), so every pixel has a feature whatever the layout. `create_seg_head` builds a head by name
(``SEG_HEADS``: ``linear``, ``conv``).
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


def conv_bn_gelu(in_dim: int, out_dim: int, kernel_size: int) -> nn.Sequential:
    """Conv (no bias: the BatchNorm's shift replaces it) -> BatchNorm -> GELU, "same" padding."""
    return nn.Sequential(nn.Conv2d(in_dim, out_dim, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_dim), nn.GELU())


class ConvSegHead(nn.Module):
    """A light decoder on a ``[B, C, h, w]`` feature map: 1x1 conv to ``dim`` channels, ``depth`` 3x3 convs
    (each conv -> BatchNorm -> GELU), then a 1x1 classifier; logits upsampled bilinearly as `LinearSegHead`'s.

    The 3x3 convolutions see each cell's neighbours, so the cells of a large token, which `to_dense` repeats
    over its block, get different logits near the block's edges (a linear head gives the block one value).

    Args:
        in_dim: feature channels (the backbone's ``num_features``).
        num_classes: output classes (the ignore value is not a class).
        dim: the decoder's channels.
        depth: the number of 3x3 conv stages.
        dropout: channel dropout before the classifier (0: none).
    """

    def __init__(self, in_dim: int, num_classes: int, dim: int = 128, depth: int = 2, dropout: float = 0.0):
        super().__init__()
        self.num_classes = int(num_classes)
        self.proj = conv_bn_gelu(in_dim, dim, 1)
        self.blocks = nn.Sequential(*[conv_bn_gelu(dim, dim, 3) for _ in range(depth)])
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(dim, num_classes, kernel_size=1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, fmap: torch.Tensor, size: Optional[Size] = None) -> torch.Tensor:
        """Logits ``[B, K, h, w]``, upsampled to ``size`` (H, W) when given."""
        logits = self.classifier(self.drop(self.blocks(self.proj(fmap))))
        return logits if size is None else upsample_logits(logits, size)


SEG_HEADS = {"linear": LinearSegHead, "conv": ConvSegHead}


def create_seg_head(kind: str, in_dim: int, num_classes: int, **kwargs) -> nn.Module:
    """The segmentation head named ``kind`` (a key of ``SEG_HEADS``); ``kwargs`` go to its constructor."""
    if kind not in SEG_HEADS:
        raise ValueError(f"segmentation head {kind!r}: not one of {', '.join(SEG_HEADS)}")
    return SEG_HEADS[kind](in_dim, num_classes, **kwargs)


def freeze_norm_stats(module: nn.Module) -> None:
    """Put every BatchNorm of ``module`` in eval mode: its running statistics stay fixed (small-batch
    fine-tunes) while its affine parameters still train. Call after ``module.train()``."""
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            m.eval()


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
