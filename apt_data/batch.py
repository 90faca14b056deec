"""`PackedBatch`: the one batch type shared by apt_data (which builds it) and apt_model (which eats it).

Every image's tokens are concatenated into one sequence; everything that shapes the computation
(``seqlens``, ``num_padding``, sizes) is a Python int, so a forward never waits on the device to
learn a length. The fields are documented in docs/batch.md.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # the batch only holds tensors; importing apt_data does not import torch
    import torch


@dataclass(frozen=True)
class PackedBatch:
    """B images' tokens packed into one sequence, with CPU metadata (fields: docs/batch.md)."""

    pixels: tuple[torch.Tensor, ...]
    coords: tuple[torch.Tensor, ...]
    seq_index: tuple[torch.Tensor, ...]
    seqlens: tuple[int, ...]
    max_seqlen: int
    image_sizes: tuple[tuple[int, int], ...]
    num_prefix_tokens: int
    patch_size: int
    num_scales: int
    num_padding: int = 0
    labels: Optional[torch.Tensor] = None
    keys: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    skip_reasons: tuple[str, ...] = ()
    mix_labels: Optional[torch.Tensor] = None
    mix_lam: Optional[torch.Tensor] = None
    masks: Optional[torch.Tensor] = None
    mask_sizes: tuple[tuple[int, int], ...] = ()

    @property
    def num_images(self) -> int:
        return len(self.image_sizes)

    @property
    def seq_len(self) -> int:
        """Length of the packed sequence, padding included."""
        return self.num_real_tokens + self.num_padding

    @property
    def num_real_tokens(self) -> int:
        """Tokens that belong to images (prefix tokens included), i.e. ``sum(seqlens)``."""
        return sum(self.seqlens)

    @property
    def mixed(self) -> bool:
        """True when the loader mixed this batch's images (its targets are soft: `soft_targets`)."""
        return self.mix_lam is not None

    def soft_targets(self, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
        """float32 ``[B, num_classes]`` target rows summing to 1, as timm's ``Mixup`` gives them:
        label smoothing, then the mix of ``labels`` and ``mix_labels`` by ``mix_lam`` (if any)."""
        from .mixing import soft_targets

        if self.labels is None:
            raise ValueError("this batch has no labels")
        return soft_targets(self.labels, num_classes, smoothing, self.mix_labels, self.mix_lam)

    @property
    def mask_offsets(self) -> tuple[int, ...]:
        """Where each image's mask starts in ``masks`` (Python ints, B + 1 of them)."""
        return tuple(itertools.accumulate((h * w for h, w in self.mask_sizes), initial=0))

    def mask(self, b: int) -> torch.Tensor:
        """Image ``b``'s mask, a ``[H, W]`` view of ``masks``."""
        if self.masks is None:
            raise ValueError("this batch has no masks")
        start = self.mask_offsets[b]
        h, w = self.mask_sizes[b]
        return self.masks[start:start + h * w].view(h, w)

    def padded_masks(self, ignore_index: int = 255) -> torch.Tensor:
        """uint8 ``[B, H_max, W_max]``: every mask at the top left, the rest ``ignore_index``."""
        import torch

        if self.masks is None:
            raise ValueError("this batch has no masks")
        hm = max((h for h, _ in self.mask_sizes), default=0)
        wm = max((w for _, w in self.mask_sizes), default=0)
        out = torch.full((len(self.mask_sizes), hm, wm), ignore_index, dtype=torch.uint8, device=self.masks.device)
        for b, (h, w) in enumerate(self.mask_sizes):
            out[b, :h, :w] = self.mask(b)
        return out

    def with_masks(self, masks, same_size: bool = True) -> "PackedBatch":
        """This batch carrying ``masks``: uint8 HxW arrays, one per image, each its image's size
        (``same_size=False``: any size, e.g. the original one), or such a list already packed,
        ``(flat, sizes)``, by `apt_data.masks.batch_masks`."""
        import torch

        from .masks import batch_masks

        flat, sizes = masks if isinstance(masks, tuple) else batch_masks(masks, self.image_sizes, self.keys, same_size)
        return replace(self, masks=torch.from_numpy(flat), mask_sizes=sizes)

    def _map(self, fn) -> "PackedBatch":
        """This batch with ``fn`` applied to every tensor (not to the CPU metadata)."""
        opt = lambda t: None if t is None else fn(t)  # noqa: E731
        return replace(self, pixels=tuple(fn(t) for t in self.pixels), coords=tuple(fn(t) for t in self.coords),
                       seq_index=tuple(fn(t) for t in self.seq_index), labels=opt(self.labels),
                       mix_labels=opt(self.mix_labels), mix_lam=opt(self.mix_lam), masks=opt(self.masks))

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        """Move the tensors (not the CPU metadata) to ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PackedBatch":
        return self._map(lambda t: t.pin_memory())
