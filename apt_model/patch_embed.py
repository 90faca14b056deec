"""`APTPatchEmbed`: one embedding per token, whatever its size.

For a token of scale s (side ``p * 2**s``, ``g = 2**s`` sub-patches per side):

    E(Resize_p(P)) + ZeroLinear_s(Down^s(E(sub-patches of P)))

- ``E`` is the pretrained patch embedding (timm ``patch_embed.proj``, a p x p stride-p conv), run
  as one GEMM over all tokens (or all sub-patches) of a scale: a conv over thousands of tiny
  "images" is slower on CPUs.
- ``Resize_p`` is area averaging (an average pool by g): the reference code's bilinear resize
  aliases at 4x. Note ``E(Resize_p(P))`` is *not* the mean of the sub-patch embeddings (that
  would superpose the sub-patches instead of shrinking the image), so it is its own GEMM on the
  pooled pixels.
- ``Down`` is a stride-2 2x2 conv per level: a scale-s token's g x g grid of sub-patch embeddings
  goes through ``down[0]``, ..., ``down[s-1]`` in turn (each halves the grid; level l is shared by
  every scale > l), initialised to average: weight = identity / 4 per tap, bias 0.
  ``ZeroLinear_s`` is a zero-initialised ``Linear(D, D)`` per scale, so a new APT model computes
  exactly what the resize-only model computes and training grows the detail path.
- Pixels arrive as uint8; the timm model's mean/std normalisation is folded into E's weights
  (``E((x/255 - mean)/std)`` is affine in the raw 0..255 values), so no normalised copy of the
  pixels is ever made.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from .packed import compute_dtype


def average_conv(dim: int) -> nn.Conv2d:
    """A 2x2 stride-2 conv that starts as a 2x2 average pool of each channel."""
    conv = nn.Conv2d(dim, dim, kernel_size=2, stride=2)
    with torch.no_grad():
        conv.weight.zero_()
        idx = torch.arange(dim)
        conv.weight[idx, idx] = 0.25
        conv.bias.zero_()
    return conv


def zero_linear(dim: int) -> nn.Linear:
    """A Linear(D, D) whose weight and bias start at zero (the detail path starts switched off)."""
    lin = nn.Linear(dim, dim)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


class APTPatchEmbed(nn.Module):
    """Multi-scale patch embedding sharing the pretrained projection ``proj`` (and its weights).

    Args:
        proj: the base patch embedding, a square Conv2d with stride == kernel size (timm's
            ``patch_embed.proj``).
        num_scales: token sizes ``p * 2**s`` for ``s < num_scales``.
        mean, std: the pixel normalisation of the pretrained model (0..1 scale).
        norm: timm's ``patch_embed.norm`` (applied to every token's embedding), if any.
    """

    def __init__(self, proj: nn.Conv2d, num_scales: int = 3, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), norm: Optional[nn.Module] = None):
        super().__init__()
        if (not isinstance(proj, nn.Conv2d) or proj.kernel_size[0] != proj.kernel_size[1]
                or tuple(proj.stride) != tuple(proj.kernel_size) or proj.in_channels != 3 or proj.groups != 1
                or tuple(proj.padding) != (0, 0) or tuple(proj.dilation) != (1, 1)):
            raise ValueError(f"APTPatchEmbed needs a square patchifying Conv2d (3 input channels, stride = kernel, "
                             f"no padding), got {proj}")
        if num_scales < 1:
            raise ValueError(f"num_scales must be >= 1, got {num_scales}")
        self.patch_size = int(proj.kernel_size[0])
        self.num_scales = int(num_scales)
        self.embed_dim = int(proj.out_channels)
        self.proj = proj
        self.norm = norm if norm is not None else nn.Identity()
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1) * 255,
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1) * 255,
                             persistent=False)
        self.down = nn.ModuleList([average_conv(self.embed_dim) for _ in range(num_scales - 1)])
        self.zero_linear = nn.ModuleList([zero_linear(self.embed_dim) for _ in range(num_scales - 1)])

    @classmethod
    def from_vit(cls, vit: nn.Module, num_scales: int = 3, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None) -> "APTPatchEmbed":
        """The embedding of a timm ViT (its ``patch_embed.proj``/``norm``, shared), normalising with
        ``mean``/``std`` or else the model's ``pretrained_cfg`` values."""
        pe = vit.patch_embed
        cfg = getattr(vit, "pretrained_cfg", None) or {}
        return cls(pe.proj, num_scales, mean or cfg.get("mean", (0.5, 0.5, 0.5)),
                   std or cfg.get("std", (0.5, 0.5, 0.5)), norm=getattr(pe, "norm", None))

    def folded_projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """E with the normalisation folded in: ``E((x - mean) / std) = x @ W'.T + b'`` for raw
        0..255 pixels ``x``, as a ``[3*p*p, D]`` matrix and a ``[D]`` bias (cheap; keeps autograd)."""
        d = self.embed_dim
        w = self.proj.weight.reshape(d, 3, -1)
        w = w / self.pixel_std.to(w.dtype)
        bias = -(w * self.pixel_mean.to(w.dtype)).sum(dim=(1, 2))
        if self.proj.bias is not None:
            bias = bias + self.proj.bias
        return w.reshape(d, -1).t(), bias

    def forward(self, pixels: torch.Tensor, scale: int, resize_only: bool = False) -> torch.Tensor:
        """Embed ``[T, 3, p*2**scale, p*2**scale]`` uint8 tokens of one scale -> ``[T, D]``.

        ``resize_only=True`` gives the resize-only baseline, ``E(Resize_p(P))``, and skips the
        sub-patch embeddings altogether.
        """
        T, p, g = pixels.shape[0], self.patch_size, 1 << scale
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, g * p, g * p):
            raise ValueError(f"scale-{scale} tokens must be [T, 3, {g * p}, {g * p}], got {tuple(pixels.shape)}")
        w, b = self.folded_projection()
        # Pixels are converted once, straight to the dtype the GEMM runs in (bf16 under autocast:
        # 0..255 are exact there), and rearranged while still uint8 (1 byte a pixel, not 4).
        cdtype = compute_dtype(pixels.device, w.dtype)
        if scale == 0:
            return self.norm(torch.addmm(b, pixels.reshape(T, 3 * p * p).to(cdtype), w))
        # Resize_p: area average of each g x g pixel block -> [T, 3, p, p]; the integer sum is exact
        blocks = pixels.view(T, 3, p, g, p, g).sum(dim=(3, 5), dtype=torch.int32)
        small = blocks.to(torch.float32).div_(g * g).to(cdtype)
        emb = torch.addmm(b, small.reshape(T, 3 * p * p), w)
        if not resize_only:
            # E on every sub-patch: [T, 3, g*p, g*p] -> [T*g*g, 3*p*p] (raster order) -> [T, D, g, g]
            sub = pixels.view(T, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(T * g * g, 3 * p * p)
            r = torch.addmm(b, sub.to(cdtype), w).view(T, g, g, self.embed_dim).permute(0, 3, 1, 2)
            for level in range(scale):
                r = self.down[level](r)
            emb = emb + self.zero_linear[scale - 1](r.flatten(1))
        return self.norm(emb)
