"""What an `APTLoader` worker process runs for streamed packing: a packing stream turned into batches.

(Planned packing's worker side, `PlannedBins`, is in `apt_data.planned`.) `StreamEpoch` is the worker
side of streaming packing (`apt_data.stream`):
the worker draws its own samples, runs each through the loader's per-sample pipeline (read ->
transform -> layout), packs them by their real token counts and yields each batch tagged with its
role and the `WorkerState` after it, from which the main process can continue the stream exactly.

A `StreamEpoch` keeps its stream, its open batches and their decoded images between epochs when
the DataLoader keeps its workers (``persistent_workers``): the next epoch then continues in memory
instead of decoding the carried-over samples again.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from torch.utils.data import IterableDataset

from .stream import Item, SampleStream, StreamPacker, WorkerState, epoch_batches, partition
from .transport import worker_id

if TYPE_CHECKING:
    from .transport import SlotPool

log = logging.getLogger("apt_data.loader")

#: an `apt_data.loader.APTLoader` (not imported here: the loader imports this module)
Loader = Any

__all__ = ["StreamEpoch", "TaggedBatch"]


class TaggedBatch:
    """A batch (a `PackedBatch` or a `WireBatch`) with the worker role and stream state after it."""

    def __init__(self, batch, role: int, state: WorkerState):
        self.batch, self.role, self.state = batch, role, state

    def pin_memory(self) -> "TaggedBatch":
        if hasattr(self.batch, "pin_memory"):
            self.batch = self.batch.pin_memory()
        return self


class StreamEpoch(IterableDataset):
    """Worker side of streaming packing for one rank.

    ``starts[role]``: each role's state at the start of ``epoch``; ``progress[role]``: its state
    after the last batch the main process consumed in this epoch (None: none yet). Worker ``id``
    plays role ``(id + offset) % num_workers``, so a run resumed after ``k`` batches continues the
    DataLoader's round-robin where it stood. ``quotas[role]``: batches per epoch (None: one pass,
    evaluation).
    """

    def __init__(self, loader: Loader, epoch: int, starts: list[WorkerState],
                 progress: list[Optional[WorkerState]], offset: int, quotas: Optional[list[int]],
                 pool: Optional["SlotPool"] = None):
        self.loader, self.epoch, self.starts, self.progress = loader, epoch, starts, progress
        self.offset, self.quotas, self.pool = offset, quotas, pool
        self._live = None  # (role, stream, packer, epoch, state) kept in the worker between epochs

    def _process(self, ref) -> Optional[Item]:
        """One sample through the pipeline: an `Item`, or None when it is skipped as bad."""
        p, i = ref
        dense = self._pipeline.source.has_masks
        loaded = self._pipeline.try_load(i, p, self._skipped, self._exact, with_mask=dense)
        if loaded is None:
            return None
        img, mask, layout, mixed = loaded if dense else (loaded[0], None) + loaded[1:]  # mask: beside its image
        key = self._pipeline.source.keys[i]
        tokens = len(layout) + self._pipeline.num_prefix_tokens
        if tokens > self._pipeline.max_tokens:
            raise ValueError(f"sample {key} needs {tokens} tokens, more than the batch budget "
                             f"max_tokens={self._pipeline.max_tokens}; raise --max-tokens or lower the image size")
        return Item(ref, tokens, (img, layout, int(self._pipeline.source.labels[i]), key, mixed, mask))

    def _restore(self, bins: list, ready: int) -> StreamPacker:
        loader = self.loader
        packer = StreamPacker(loader.max_tokens, loader.max_images, loader.open_bins)
        items = []
        for b in bins:
            row = []
            for p, s, tokens in b:
                it = self._process((p, s))
                if it is None or it.tokens != tokens:
                    raise RuntimeError(f"sample {loader.source.keys[s]} gives {None if it is None else it.tokens} "
                                       f"tokens on resume, {tokens} before: the data or the transform changed")
                row.append(it)
            items.append(row)
        packer.restore(items, ready)
        return packer

    def __iter__(self):
        loader = self.loader
        wid, nw = worker_id()
        self._skipped = getattr(self, "_skipped", [])
        self._pipeline = loader.pipeline
        self._exact = loader._exact  # the index's counts for this setup, checked against every layout
        if self._live is None:
            role = (wid + self.offset) % nw
            start = self.starts[role]
            stream = SampleStream(partition(len(loader.source), loader.seed, loader.rank, loader.world_size, role, nw,
                                            loader.shuffle),
                                  loader.seed, loader.rank * nw + role, loader.shuffle, state=start)
            prog = self.progress[role]
            if prog is not None:
                stream.replay(prog.draws, prog.resets)
                packer, emitted = self._restore(prog.bins, prog.ready), prog.emitted
            else:
                packer, emitted = self._restore(start.bins, start.ready), 0
            epoch = self.epoch
        else:  # a kept worker: the next epoch continues in memory
            role, stream, packer, epoch, state = self._live
            epoch += 1
            stream.start(state.next_epoch())
            emitted = 0
        quota = None if self.quotas is None else self.quotas[role]
        state = stream.state(packer, emitted)
        # the samples this worker will draw next (deferred first, then its passes), for read-ahead
        upcoming = [np.asarray([s for _, s in stream.deferred], np.int64), stream.order(stream.pass_)[stream.index:],
                    stream.order(stream.pass_ + 1)]
        loader.source.read_order(np.concatenate(upcoming))

        def on_reset(missing: int) -> None:
            log.warning("epoch %d, rank %d, worker %d: one pass over its %d samples cannot fill %d more batches; "
                        "drawing them again in this epoch (many skipped samples, or steps_per_epoch set too "
                        "high)", epoch, loader.rank, role, len(stream), missing)

        for items, state in epoch_batches(stream, packer, quota, self._process, emitted, on_reset):
            self._live = (role, stream, packer, epoch, state)
            skipped, self._skipped = self._skipped, []
            images, layouts, labels, keys, mixes, masks = (list(v) for v in zip(*(it.payload for it in items)))
            masks = masks if self._pipeline.source.has_masks else None
            batch = self._pipeline.ship(images, layouts, labels, keys, skipped, self.pool, mixes, masks)
            yield TaggedBatch(batch, role, state)
        self._live = (role, stream, packer, epoch, state)
