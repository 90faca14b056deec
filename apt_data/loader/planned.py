"""Planned packing: every epoch's bins made up front from per-sample token counts.

Counts are the index's exact ones, else uniform-grid upper bounds. A plan is a pure function of
``(seed, epoch)``, the same on every rank (`pack_greedy`, `split_for_ranks`); `PlannedBins` deals
this rank's bins to the workers.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
from torch.utils.data import IterableDataset

from ..binpack import pack_greedy, split_for_ranks
from ..pipeline import SamplePipeline, SkipLimit, SkipLog, SkippedOnly
from ..transforms import ImageTransform
from ..transport import WireBatch, worker_id

if TYPE_CHECKING:
    from ..sources import Source
    from ..transport import SlotPool
    from .driver import APTLoader

log = logging.getLogger("apt_data.loader")

__all__ = ["PlannedBins", "PlannedPacking", "plan_epoch", "uniform_token_counts"]


def uniform_token_counts(source: "Source", transform: ImageTransform, patch_size: int) -> np.ndarray:
    """Uniform-grid patch tokens of every sample after ``transform`` (an upper bound of its APT tokens;
    keep-aspect reads each size, an unreadable sample counts 1)."""
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
    """Worker side of a planned epoch: this rank's ``bins``, dealt round-robin to the workers.

    ``pad``: a bin of bad samples only becomes a batch of the worker's next readable sample (ranks stay
    in step). ``limit``: the rank's skip limit, applied to each worker's share.
    """

    def __init__(self, pipeline: SamplePipeline, bins: list[np.ndarray], epoch: int, exact: Optional[np.ndarray],
                 limit: SkipLimit, pool: Optional["SlotPool"] = None, pad: bool = False):
        self.pipeline, self.bins, self.epoch, self.exact = pipeline, bins, epoch, exact
        self.limit, self.pool, self.pad = limit, pool, pad

    def __iter__(self):
        wid, nw = worker_id()
        mine = self.bins[wid::nw]
        share = sum(len(b) for b in mine)
        limit = SkipLimit(self.limit.max_fraction, share, self.epoch, f"{self.limit.where}, worker {wid}")
        skips = SkipLog(limit)
        if mine:
            self.pipeline.source.read_order(np.concatenate(mine))
        for k, b in enumerate(mine):
            batch = self.pipeline.build(b, self.epoch, skips, self.exact, pool=self.pool)
            if isinstance(batch, SkippedOnly) and self.pad:
                batch = self._padding(mine, k, skips, batch)
            yield batch

    def _padding(self, mine: list[np.ndarray], k: int, skips: SkipLog, empty: SkippedOnly):
        """The worker's first readable sample after bin ``k`` (wrapping round) as a batch of its own."""
        for b in mine[k + 1:] + mine[:k]:
            for i in b.tolist():
                skips.pending[:0] = zip(empty.skipped, empty.skip_reasons)  # they travel with the padding
                got = self.pipeline.build(np.array([i]), self.epoch, skips, self.exact, pool=self.pool)
                if not isinstance(got, SkippedOnly):
                    log.warning("a planned batch of bad samples only (%s) is padded with sample %s",
                                ", ".join(empty.skipped), self.pipeline.source.keys[i])
                    return got
                empty = got
        return empty


class PlannedPacking:
    """Planned packing as a strategy of `apt_data.loader.APTLoader`: epochs of pre-planned bins."""

    name = "plan"
    default_open_bins = 8
    persistent_workers = False  # a planned epoch's workers stop at its end

    def __init__(self, loader: "APTLoader", start_step: int = 0, steps: Optional[int] = None):
        """``steps`` (a streamed epoch's length) has no meaning here: a plan's length is its bins."""
        self.loader, self.start_step = loader, int(start_step)
        self.done = 0  # bins received in the iteration under way

    @property
    def plans_from_index(self) -> bool:
        return self.loader.index_counts is not None

    def clone(self, loader: "APTLoader") -> "PlannedPacking":
        return PlannedPacking(loader, self.start_step)

    def rank_bins(self) -> list[np.ndarray]:
        ld = self.loader
        return ld.plan(ld.epoch)[ld.rank::ld.world_size]

    def steps_per_epoch(self) -> int:
        return len(self.rank_bins())

    def remaining(self) -> int:
        return max(0, len(self.rank_bins()) - self.start_step)

    def mean_images_per_batch(self) -> float:
        bins = self.rank_bins()
        return sum(len(b) for b in bins) / max(1, len(bins))

    def describe(self) -> str:
        how = "exact token counts of the index" if self.loader.index_counts is not None else "uniform-grid bounds"
        return f"planned packing from {how}, {self.mean_images_per_batch():.1f} images per batch (mean of the epoch's plan)"

    def set_epoch(self, epoch: int, changed: bool) -> None:
        if changed:
            self.start_step, self.done = 0, 0

    def resume_from(self, epoch: int, step: int, state: Optional[dict]) -> None:
        self.start_step, self.done = int(step if state is None else state["step"]), 0

    def state(self) -> dict:
        return {"step": self.start_step + self.done}

    def begin(self) -> None:
        self.done = 0

    def reusable(self, live) -> bool:
        return False

    def dataset(self, pool: Optional["SlotPool"]) -> PlannedBins:
        ld = self.loader
        limit = SkipLimit(ld.max_skip_fraction, 0, ld.epoch, f"rank {ld.rank}")
        return PlannedBins(ld.pipeline, self.rank_bins()[self.start_step:], ld.epoch, ld.index_counts, limit, pool,
                           pad=ld.world_size > 1)

    def batch_bytes(self) -> Optional[int]:
        per_image = self.loader.bytes_per_image()
        bins = self.rank_bins()[self.start_step:]
        return None if per_image is None else max((int(per_image[b].sum()) for b in bins), default=0)

    def receive(self, item) -> tuple[object, bool]:
        """A worker's item as ``(batch or SkippedOnly, the epoch's last)``."""
        self.done += 1
        return (item.to_batch() if isinstance(item, WireBatch) else item), False

    def carried_over(self) -> int:
        return 0  # a planned epoch reads every sample once

    def finish(self) -> None:
        self.start_step, self.done = 0, 0  # a resumed epoch continues once; iterating again starts it from 0
