"""Planned packing: every epoch's bins made up front from per-sample token counts, and its iteration.

The counts are exact where a shard index holds them for the loader's config and transform, else the
uniform-grid count of each sample, an upper bound (APT never adds tokens). An epoch's plan is a pure
function of ``(seed, epoch)``, identical on every rank: samples shuffled, packed greedily
(`apt_data.binpack.pack_greedy`) and split so every rank gets as many bins (`split_for_ranks`).
`PlannedBins` is the worker side: this rank's bins, dealt round-robin to the workers, each built by
the loader's per-sample pipeline. The streamed alternative lives in `apt_data.stream` and
`apt_data.worker`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import numpy as np
from torch.utils.data import DataLoader, IterableDataset

from .binpack import pack_greedy, split_for_ranks
from .pipeline import SkippedOnly
from .transforms import ImageTransform
from .transport import WireBatch, worker_id

if TYPE_CHECKING:
    from .sources import Source
    from .transport import SlotPool

#: an `apt_data.loader.APTLoader` (not imported here: the loader imports this module)
Loader = Any

__all__ = ["PlannedBins", "iter_planned", "plan_epoch", "uniform_token_counts"]


def uniform_token_counts(source: "Source", transform: ImageTransform, patch_size: int) -> np.ndarray:
    """Uniform-grid patch tokens of every sample after ``transform``: an upper bound of its APT tokens.
    Keep-aspect transforms read each sample's size (an unreadable one counts 1: loading it then
    counts the skip)."""
    p = patch_size
    if not transform.keep_aspect:
        return np.full(len(source), (transform.size // p) ** 2, np.int64)
    bound = np.empty(len(source), np.int64)
    for i in range(len(source)):
        wh = source.image_size(i)
        if wh is None:
            bound[i] = 1
            continue
        h, w = transform.output_size(*wh)
        bound[i] = (h // p) * (w // p)
    return bound


def plan_epoch(counts: np.ndarray, keys: Sequence[str], seed: int, epoch: int, shuffle: bool, max_tokens: int,
               max_images: Optional[int], open_bins: int, world_size: int) -> list[np.ndarray]:
    """All ranks' bins of ``epoch`` (arrays of sample indices; rank ``r`` takes ``bins[r::world_size]``)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(counts)) if shuffle else np.arange(len(counts))
    bins = pack_greedy(counts[order], max_tokens, max_images, open_bins, names=[keys[i] for i in order])
    return split_for_ranks([order[b] for b in bins], world_size)


class PlannedBins(IterableDataset):
    """Worker side of planned epochs: this rank's bins, dealt round-robin to the workers."""

    def __init__(self, loader: Loader, bins: list[np.ndarray], epoch: int, exact: Optional[np.ndarray],
                 pool: Optional["SlotPool"] = None):
        self.loader, self.bins, self.epoch, self.exact, self.pool = loader, bins, epoch, exact, pool

    def __iter__(self):
        wid, nw = worker_id()
        pipeline = self.loader.pipeline
        mine = self.bins[wid::nw]
        if mine:
            pipeline.source.read_order(np.concatenate(mine))
        for b in mine:
            yield pipeline.build(b, self.epoch, self.exact, pool=self.pool)


def iter_planned(loader: Loader) -> Iterator[tuple]:
    """``(batch, targets)`` of the loader's planned epoch from its ``start_step`` (its workers stopped at
    the end, so no worker still writes into the slot pool when it is handed out again)."""
    from . import warmup

    bins = loader.rank_bins()[loader.start_step:]
    if loader.num_workers == 0:
        dl = DataLoader(PlannedBins(loader, bins, loader.epoch, loader._exact), batch_size=None, num_workers=0,
                        pin_memory=loader.pin_memory)
        for batch in dl:
            if not isinstance(loader._account(batch), SkippedOnly):
                yield batch, loader._targets(batch)
        loader.start_step = 0  # a resumed epoch continues once; iterating again starts it from 0
        return
    warmup()  # compiled kernels are inherited by forked workers
    per_image = loader._uniform_per_image()
    pool = loader._take_pool(None if per_image is None else max(per_image[b].sum() for b in bins) if bins else 0)
    dl = DataLoader(PlannedBins(loader, bins, loader.epoch, loader._exact, pool), batch_size=None,
                    num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                    prefetch_factor=loader.prefetch_factor, persistent_workers=False)
    it = iter(dl)
    try:
        for item in it:
            batch = item.to_batch() if isinstance(item, WireBatch) else item
            if not isinstance(loader._account(batch), SkippedOnly):  # a bin of bad samples only
                yield batch, loader._targets(batch)
        loader.start_step = 0
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
            if pool is not None:
                pool.busy = False
