"""Index helpers for packed sequences, built from the batch's Python ints (and `PackedBatchLike`, the
batch fields the models read).

Every index tensor the model needs (segment of each token, pooled positions, padded slots) is
derived from host-side ints and copied to the device without a blocking transfer, so a forward
never reads a device tensor back (no host-device sync, CUDA graphs and async loading stay possible).
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch


class PackedBatchLike(Protocol):
    """What the models read of a packed batch (apt_data's ``PackedBatch``; duck-typed, since apt_model
    never imports apt_data). Segments are the host ints ``seqlens`` (one per image) and
    ``num_padding`` (a trailing padding segment); device index tensors are built from them here."""

    @property
    def pixels(self) -> Sequence[torch.Tensor]: ...        # uint8 [T_s, 3, p*2**s, p*2**s] per scale
    @property
    def coords(self) -> Sequence[torch.Tensor]: ...        # int32 [T_s, 3]: (image, y, x) in base cells
    @property
    def seq_index(self) -> Sequence[torch.Tensor]: ...     # int64 [T_s]: packed position of each token
    @property
    def seqlens(self) -> Sequence[int]: ...
    @property
    def num_padding(self) -> int: ...
    @property
    def image_sizes(self) -> Sequence[tuple[int, int]]: ...
    @property
    def num_prefix_tokens(self) -> int: ...
    @property
    def patch_size(self) -> int: ...
    @property
    def num_scales(self) -> int: ...
    @property
    def num_images(self) -> int: ...
    @property
    def seq_len(self) -> int: ...


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without a blocking host-device sync (from pinned memory on CUDA)."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def device_index(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """A small int64 tensor built on the host and copied without a blocking host-device sync."""
    return host_to_device(torch.tensor(list(values), dtype=torch.int64), device)


def segment_ids(seqlens: Sequence[int], device: torch.device) -> torch.Tensor:
    """int64 ``[sum(seqlens)]``: the segment of every position (built on the device, no sync)."""
    return torch.repeat_interleave(torch.arange(len(seqlens), device=device), device_index(seqlens, device),
                                   output_size=sum(seqlens))


def segment_starts(seqlens: Sequence[int]) -> list[int]:
    """Host-side start offset of every segment."""
    out, start = [], 0
    for n in seqlens:
        out.append(start)
        start += n
    return out


def compute_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    """The dtype matrix products run in here: autocast's when it is on for ``device``, else ``default``."""
    kind = torch.device(device).type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return default
