"""`APTPatchEmbed`: one embedding per token, whatever its size.

For a token of scale s (side ``p * 2**s``):  ``E(Resize_p(P)) + ZeroLinear(Down^s(E(subpatches)))``.

- ``E`` is the pretrained patch embedding (a p x p, stride-p conv). Applied to the whole token it
  gives the embeddings of its ``2**s x 2**s`` sub-patches at once.
- ``Resize_p`` is area averaging. E is linear, so ``E(area_resize(P))`` equals the mean of the
  sub-patch embeddings: no second conv, and no aliasing (the reference code resizes bilinearly).
- ``Down`` is a stride-2 2x2 conv per level (level l maps a 2^l-cell grid to a 2^(l+1) one),
  initialised to average; ``ZeroLinear`` is zero-initialised, so a new APT model computes exactly
  what the resize-only model computes, and training grows the detail path from there.
Pixels arrive as uint8; normalisation (the timm model's mean/std) happens here.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn


def _average_conv(dim: int) -> nn.Conv2d:
    conv = nn.Conv2d(dim, dim, kernel_size=2, stride=2)
    with torch.no_grad():
        conv.weight.zero_()
        idx = torch.arange(dim)
        conv.weight[idx, idx] = 0.25
        conv.bias.zero_()
    return conv


def _zero_linear(dim: int) -> nn.Linear:
    lin = nn.Linear(dim, dim)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


class APTPatchEmbed(nn.Module):
    def __init__(self, proj: nn.Conv2d, num_scales: int = 3, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), norm: Optional[nn.Module] = None):
        super().__init__()
        if proj.kernel_size[0] != proj.kernel_size[1] or proj.stride != proj.kernel_size:
            raise ValueError(f"APTPatchEmbed needs a square patchifying conv, got kernel {proj.kernel_size} stride {proj.stride}")
        self.patch_size = int(proj.kernel_size[0])
        self.num_scales = int(num_scales)
        self.embed_dim = int(proj.out_channels)
        self.proj = proj
        self.norm = norm if norm is not None else nn.Identity()
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255, persistent=False)
        self.down = nn.ModuleList([_average_conv(self.embed_dim) for _ in range(num_scales - 1)])
        self.zero_linear = nn.ModuleList([_zero_linear(self.embed_dim) for _ in range(num_scales - 1)])

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [T, 3, P, P] -> float normalised like the timm model's eval transform."""
        return (pixels.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std

    def forward(self, pixels: torch.Tensor, scale: int, resize_only: bool = False) -> torch.Tensor:
        """Embed ``[T, 3, p*2**scale, p*2**scale]`` uint8 tokens of one scale -> ``[T, D]``."""
        x = self.normalize(pixels)
        sub = self.proj(x)  # [T, D, 2**s, 2**s]: the sub-patch embeddings
        if scale == 0:
            return self.norm(sub.flatten(1))
        emb = sub.mean(dim=(2, 3))  # == proj(area_resize(x)): proj is linear
        if not resize_only:
            r = sub
            for level in range(scale):
                r = self.down[level](r)
            emb = emb + self.zero_linear[scale - 1](r.flatten(1))
        return self.norm(emb)
