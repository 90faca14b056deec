"""`APTBackbone`: what `APTViT` and `APTWindowedViT` both take from a timm model.

The APT patch embedding (the only new parameters) plus the timm model's own modules, adopted by
reference, so a timm checkpoint loads as is.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from .attention import BACKENDS
from .patch_embed import APTPatchEmbed


class APTBackbone(nn.Module):
    """Base of the APT models: ``patch_embed``, then the timm modules named in ``adopt``, in that order
    (the parameter order optimizer states are saved in)."""

    def __init__(self, vit: nn.Module, num_scales: int, attn_backend: str, mean: Optional[tuple],
                 std: Optional[tuple], adopt: tuple[str, ...]):
        super().__init__()
        if attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend must be one of {BACKENDS}, got {attn_backend!r}")
        self.patch_embed = APTPatchEmbed.from_vit(vit, num_scales, mean, std)
        self.patch_size = self.patch_embed.patch_size
        self.num_scales = int(num_scales)
        self.num_classes = int(getattr(vit, "num_classes", 0))
        self.global_pool = vit.global_pool
        self.grid_size = tuple(vit.patch_embed.grid_size)
        for name in adopt:
            setattr(self, name, getattr(vit, name))
        self.attn_backend = attn_backend
        self.resize_only = False  # True: skip the zero-linear detail path (the "resize" baseline)
        self.grad_checkpointing = False

    def apt_parameters(self) -> list[nn.Parameter]:
        """The parameters APT adds (down convs and zero linears), e.g. for ``--train-new-only``."""
        return [p for n, p in self.patch_embed.named_parameters() if n.startswith(("down.", "zero_linear."))]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable
