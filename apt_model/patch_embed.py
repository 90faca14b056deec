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

    def folded_projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """E with the pixel normalisation folded in: ``E((x - mean) / std) = x @ W'.T + b'`` on raw
        0..255 values, as a ``[D, 3*p*p]`` matrix and a ``[D]`` bias (cheap; keeps autograd)."""
        d, pp = self.embed_dim, self.patch_size * self.patch_size
        w = self.proj.weight.reshape(d, 3, pp)
        inv_std = (1.0 / self.pixel_std).view(1, 3, 1).to(w.dtype)
        w = w * inv_std
        bias = -(w * self.pixel_mean.view(1, 3, 1).to(w.dtype)).sum(dim=(1, 2))
        if self.proj.bias is not None:
            bias = bias + self.proj.bias
        return w.reshape(d, 3 * pp), bias

    def forward(self, pixels: torch.Tensor, scale: int, resize_only: bool = False) -> torch.Tensor:
        """Embed ``[T, 3, p*2**scale, p*2**scale]`` uint8 tokens of one scale -> ``[T, D]``.

        The sub-patch embeddings are one GEMM over all sub-patches (a conv over many tiny images
        is several times slower on CPUs).
        """
        T, p, g = pixels.shape[0], self.patch_size, 1 << scale
        w, b = self.folded_projection()
        if scale == 0:
            x = pixels.reshape(T, 3 * p * p)
        else:  # [T, 3, g*p, g*p] -> [T*g*g, 3*p*p], sub-patches in raster order
            x = pixels.reshape(T, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(T * g * g, 3 * p * p)
        sub = torch.addmm(b.to(w.dtype), x.to(w.dtype), w.t())  # [T*g*g, D]
        if scale == 0:
            return self.norm(sub)
        sub = sub.view(T, g * g, self.embed_dim)
        emb = sub.mean(dim=1)  # == E(area_resize(P)): E is affine
        if not resize_only:
            r = sub.transpose(1, 2).reshape(T, self.embed_dim, g, g)
            for level in range(scale):
                r = self.down[level](r)
            emb = emb + self.zero_linear[scale - 1](r.flatten(1))
        return self.norm(emb)
