"""Loss for steps whose number of images varies (token-budget batches), alone or under DDP.

The loss of a step is the cross-entropy MEAN over all images of the global step. Each rank computes
the mean over its own ``B_r`` images and multiplies it by ``B_r * W / N`` (``W`` ranks, ``N`` images
in the global step, i.e. its images over the mean images per rank). DDP averages gradients over
the ``W`` ranks, so the applied gradient is ``(1/W) sum_r (B_r W / N) grad mean_r
= (1/N) sum_i grad loss_i``: the gradient of the mean over every image of the step, whatever the
split. (Plain per-rank means averaged by DDP would weigh an image of a 10-image batch twice as
much as one of a 20-image batch.) With one process the factor is 1.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def loss_scale(local_images, global_images, world_size: int):
    """``local_images * world_size / global_images``: the factor on a rank's mean loss (see module)."""
    return local_images * world_size / global_images


def scaled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0,
                         global_images: Optional[torch.Tensor] = None, world_size: int = 1) -> torch.Tensor:
    """Cross-entropy mean over this rank's images times `loss_scale` (fp32 whatever the autocast).

    ``labels``: int64 ``[B]``, or float ``[B, C]`` soft targets (Mixup / CutMix, already smoothed).
    ``global_images``: the images of the global step (summed over ranks; a tensor, so no host sync).
    """
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    if global_images is None or world_size == 1:
        return loss
    return loss * loss_scale(labels.shape[0], global_images.to(loss.dtype), world_size)
