"""Streamed packing: every worker packs its own share of the samples by their real token counts.

`StreamEpoch` runs in a worker: it draws samples (`apt_data.loader.stream`), runs them through the
pipeline, packs them and yields each batch with its role and `WorkerState`; with persistent workers
it keeps its stream and decoded images between epochs. `StreamedPacking` is the loader's strategy.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
from torch.utils.data import IterableDataset

from ..pipeline import SamplePipeline, SkipLimit, SkipLog
from ..transport import WireBatch, forks, worker_id
from .probe import ProbeBoard, probe_ids
from .stream import (Item, NothingReadable, RankStream, SampleStream, StreamPacker, WorkerState, epoch_batches,
                     epoch_length, partition, worker_quotas)

if TYPE_CHECKING:
    from ..transport import SlotPool
    from .driver import APTLoader

log = logging.getLogger("apt_data.loader")

__all__ = ["StreamEpoch", "StreamedPacking", "TaggedBatch"]


class TaggedBatch:
    """A batch (a `PackedBatch` or a `WireBatch`) with the worker role and stream state after it."""

    def __init__(self, batch, role: int, state: WorkerState):
        self.batch, self.role, self.state = batch, role, state

    def pin_memory(self) -> "TaggedBatch":
        if hasattr(self.batch, "pin_memory"):
            self.batch = self.batch.pin_memory()
        return self


@dataclass(frozen=True)
class StreamSetup:
    """What a streaming worker needs besides its pipeline: how the samples are dealt and packed."""

    seed: int
    rank: int
    world_size: int
    shuffle: bool
    open_bins: int
    max_skip_fraction: float


@dataclass
class _Kept:
    """A worker's stream kept in memory between epochs (persistent workers)."""

    role: int
    stream: SampleStream
    packer: StreamPacker
    epoch: int
    state: WorkerState


class StreamEpoch(IterableDataset):
    """Worker side of streaming packing for one rank.

    ``starts``/``progress``: each role's state at the epoch's start and after its last consumed batch.
    Worker ``id`` plays role ``(id + offset) % num_workers`` (a resumed run continues the round-robin).
    ``quotas[role]``: batches per epoch (None: one pass; with a ``board``, probed first); ``spread``:
    each is a whole pass, its samples spread evenly over its batches.
    """

    def __init__(self, pipeline: SamplePipeline, setup: StreamSetup, exact: Optional[np.ndarray], epoch: int,
                 starts: list[WorkerState], progress: list[Optional[WorkerState]], offset: int,
                 quotas: Optional[list[int]], pool: Optional["SlotPool"] = None, board: Optional[ProbeBoard] = None,
                 spread: bool = False):
        self.pipeline, self.setup, self.exact, self.epoch, self.spread = pipeline, setup, exact, epoch, spread
        self.starts, self.progress, self.offset, self.quotas, self.pool = starts, progress, offset, quotas, pool
        self.board = board
        self.kept: Optional[_Kept] = None
        self.probed: dict = {}  # (pass 0, sample) -> its Item (None: bad) from the probe, until drawn

    def _probe(self, role: int, nw: int) -> list[int]:
        """Probe this role's share of the epoch-length probe, wait for the other roles, and return every
        role's quota (the same on every worker: the same numbers)."""
        board, su = self.board, self.setup
        try:
            for j, i in enumerate(board.ids[role].tolist()):
                item = self.probed[(0, i)] = self._process((0, i))
                board.post(role, j, None if item is None else item.tokens)
            board.wait()
        except Exception as e:
            board.fail(e)
            raise
        n, b = len(self.pipeline.source), self.pipeline.budget
        sizes = [len(partition(n, su.seed, 0, 1, w, nw, su.shuffle)) for w in range(nw)]
        mean = board.mean(self.pipeline.source.keys[int(board.ids[0][0])] if len(board.ids[0]) else "")
        steps, self.spread = epoch_length(sizes, mean, b.max_tokens, b.max_images, nw, su.open_bins)
        return worker_quotas(steps, nw)

    def _process(self, ref) -> Optional[Item]:
        """One sample through the pipeline: an `Item`, or None when it is skipped as bad."""
        if ref in self.probed:
            return self.probed.pop(ref)
        p, i = ref
        loaded = self.pipeline.try_load(i, p, self.skips, self.exact)
        if loaded is None:
            return None
        img, mask, layout, mixed = loaded  # the mask (or None) travels beside its image
        key = self.pipeline.source.keys[i]
        tokens = self.pipeline.budget.check(len(layout) + self.pipeline.budget.num_prefix_tokens, key)
        return Item(ref, tokens, (img, layout, int(self.pipeline.source.labels[i]), key, mixed, mask))

    def _restore(self, bins: list, ready: int) -> StreamPacker:
        packer = StreamPacker(self.pipeline.budget.max_tokens, self.pipeline.budget.max_images, self.setup.open_bins)
        items = []
        for b in bins:
            row = []
            for p, s, tokens in b:
                it = self._process((p, s))
                if it is None or it.tokens != tokens:
                    raise RuntimeError(f"sample {self.pipeline.source.keys[s]} gives {None if it is None else it.tokens} "
                                       f"tokens on resume, {tokens} before: the data or the transform changed")
                row.append(it)
            items.append(row)
        packer.restore(items, ready)
        return packer

    def _begin(self, nw: int, wid: int) -> tuple[int, SampleStream, StreamPacker, int, int]:
        """``(role, stream, packer, epoch, batches emitted)`` where this worker continues."""
        if self.kept is not None:  # a kept worker: the next epoch continues in memory
            k = self.kept
            k.stream.start(k.state.next_epoch())
            return k.role, k.stream, k.packer, k.epoch + 1, 0
        su = self.setup
        role = (wid + self.offset) % nw
        start = self.starts[role]
        part = partition(len(self.pipeline.source), su.seed, su.rank, su.world_size, role, nw, su.shuffle)
        stream = SampleStream(part, su.seed, su.rank * nw + role, su.shuffle, state=start)
        prog = self.progress[role]
        if prog is not None:
            stream.replay(prog.draws, prog.resets)
            return role, stream, self._restore(prog.bins, prog.ready), self.epoch, prog.emitted
        return role, stream, self._restore(start.bins, start.ready), self.epoch, 0

    def __iter__(self):
        wid, nw = worker_id()
        su = self.setup
        self.skips = getattr(self, "skips", None) or SkipLog()
        role, stream, packer, epoch, emitted = self._begin(nw, wid)
        where = f"rank {su.rank}, worker {role}"
        self.skips.begin_epoch(SkipLimit(su.max_skip_fraction, len(stream), epoch, where))
        if self.quotas is None and self.board is not None:
            self.quotas = self._probe(role, nw)
        quota = None if self.quotas is None else self.quotas[role]
        state = stream.state(packer, emitted)
        # the samples this worker will draw next (deferred first, then its passes), for read-ahead
        upcoming = [np.asarray([s for _, s in stream.deferred], np.int64), stream.order(stream.pass_)[stream.index:],
                    stream.order(stream.pass_ + 1)]
        self.pipeline.source.read_order(np.concatenate(upcoming))

        def on_reset(missing: int) -> None:
            log.warning("epoch %d, %s: one pass over its %d samples cannot fill %d more batches; drawing them "
                        "again in this epoch (many skipped samples, or steps_per_epoch set too high)", epoch, where,
                        len(stream), missing)

        batches = epoch_batches(stream, packer, quota, self._process, emitted, on_reset, self.spread)
        try:
            for items, state in batches:
                self.kept = _Kept(role, stream, packer, epoch, state)
                images, layouts, labels, keys, mixes, masks = (list(v) for v in zip(*(it.payload for it in items)))
                masks = masks if self.pipeline.source.has_masks else None
                yield TaggedBatch(self.pipeline.ship(images, layouts, labels, keys, self.skips.take(), self.pool,
                                                     mixes, masks), role, state)
        except NothingReadable as e:
            self.skips.limit.check(len(stream), f"{e}; first errors: " + "; ".join(self.skips.first))
            raise
        self.kept = _Kept(role, stream, packer, epoch, state)
        self.probed.clear()


class StreamedPacking:
    """Streamed packing as a strategy of `APTLoader`: a training epoch is ``steps_per_epoch`` batches per
    rank (probed unless given), dealt to workers as read; evaluation reads one pass."""

    name = "stream"
    default_open_bins = 2
    plans_from_index = False

    def __init__(self, loader: "APTLoader", start_step: int = 0, steps: Optional[int] = None):
        """``start_step`` has no meaning here: a stream resumes from its state (`resume_from`)."""
        self.loader, self.steps = loader, None if steps is None else int(steps)
        self.whole_pass = False  # each worker's epoch one whole pass (`stream.epoch_length`), once steps are known
        self.mean: Optional[float] = None  # mean tokens per sample (prefix included), once known
        self.board: Optional[ProbeBoard] = None
        self.roles = max(1, loader.num_workers)  # worker roles of a stream (the in-process loader plays one)
        self.stream = RankStream(self.roles)
        self.persistent_workers = loader.train  # the last batch's workers hold the start of the next epoch

    def clone(self, loader: "APTLoader") -> "StreamedPacking":
        other = StreamedPacking(loader, steps=self.steps)
        other.whole_pass = self.whole_pass
        other.mean = self.mean_tokens() if self.board is not None else self.mean
        other.stream = RankStream.from_dict(self.stream.as_dict())
        return other

    def partition_sizes(self, rank: Optional[int] = None) -> list[int]:
        """Samples of each worker role: of every rank (``rank`` None, rank-major) or of one rank."""
        ld = self.loader
        ranks = range(ld.world_size) if rank is None else [rank]
        return [len(partition(len(ld.source), ld.seed, r, ld.world_size, w, self.roles, ld.shuffle))
                for r in ranks for w in range(self.roles)]

    def probe_ids(self) -> list[np.ndarray]:
        ld = self.loader
        return probe_ids(len(ld.source), ld.seed, ld.world_size, self.roles, ld.shuffle, ld.probe_samples)

    def mean_tokens(self) -> float:
        """Mean tokens per sample (prefix included) of the loader's pipeline: the index's exact counts,
        else the probe (`apt_data.loader.probe`): the workers' board once complete, else probed here."""
        if self.mean is None:
            ld = self.loader
            if ld.index_counts is not None:
                self.mean = float(ld.index_counts.mean()) + ld.budget.num_prefix_tokens
            elif self.board is not None and self.board.complete():
                self.mean = self.board.mean("")
            else:
                self.mean = ld.pipeline.mean_tokens(np.concatenate(self.probe_ids()))
        return self.mean

    def per_batch(self) -> float:
        ld = self.loader
        per = ld.budget.max_tokens * 0.99 / self.mean_tokens()
        return float(min(per, ld.budget.max_images)) if ld.budget.max_images else float(per)

    def steps_per_epoch(self) -> int:
        ld = self.loader
        if not ld.train:  # one pass per worker, its last batch partial: an estimate
            return sum(int(np.ceil(n / self.per_batch())) for n in self.partition_sizes(ld.rank))
        if self.steps is None:
            b = ld.budget
            self.steps, self.whole_pass = epoch_length(self.partition_sizes(), self.mean_tokens(), b.max_tokens,
                                                       b.max_images, self.roles, ld.open_bins)
        return self.steps

    def remaining(self) -> int:
        steps = self.steps_per_epoch()
        if self.loader.train and self.stream.consumed >= steps:  # done: iterating again starts the next epoch
            return steps
        return max(0, steps - self.stream.consumed)

    def mean_images_per_batch(self) -> float:
        return self.per_batch()

    def describe(self) -> str:
        ld = self.loader
        how = ("the index's mean tokens per image" if ld.index_counts is not None else
               f"the mean tokens of {min(len(ld.source), ld.probe_samples)} probed samples")
        whole = "; an epoch is one whole pass, spread evenly over its batches" if self.whole_pass else ""
        return f"streamed packing, {self.per_batch():.1f} images per batch (99% of the budget at {how}){whole}"

    def set_epoch(self, epoch: int, changed: bool) -> None:
        """A streamed epoch follows on from the one before it (its carried-over samples); an epoch
        reached otherwise starts its stream afresh at pass ``epoch``."""
        if epoch == self.stream.epoch:
            return
        if epoch == self.stream.epoch + 1 and self.loader.train:
            self.stream.follow()
        else:
            self.stream.restart(epoch)

    def resume_from(self, epoch: int, step: int, state: Optional[dict]) -> None:
        if state is not None:
            self.steps, self.whole_pass = state["steps_per_epoch"], bool(state.get("whole_pass", False))
            self.stream = RankStream.from_dict(state)
        elif (epoch, step) != (self.stream.epoch, self.stream.consumed):
            raise ValueError("a streamed loader resumes from its state_dict(), not from (epoch, step): its "
                             "workers' streams depend on the batches before")

    def state(self) -> dict:
        return dict(steps_per_epoch=self.steps, whole_pass=self.whole_pass, **self.stream.as_dict())

    def quotas(self) -> Optional[list[int]]:
        return worker_quotas(self.steps_per_epoch(), self.roles) if self.loader.train else None

    def probe_in_workers(self) -> bool:
        """The epoch's length is still unknown and the workers can probe it: one rank, forked workers."""
        ld = self.loader
        return (ld.train and self.steps is None and self.mean is None and ld.index_counts is None
                and ld.world_size == 1 and ld.num_workers > 0 and forks())

    def begin(self) -> None:
        """Before an iteration: evaluation starts a fresh pass; a finished training epoch the next one."""
        ld = self.loader
        if not ld.train and self.stream.consumed == 0:
            self.stream.restart(ld.epoch)
        if ld.train and self.stream.consumed and self.stream.consumed >= self.steps_per_epoch():
            ld.set_epoch(ld.epoch + 1)

    def reusable(self, live) -> bool:
        """Kept workers serve this iteration when they hold the end of the epoch before and start at role 0."""
        return (live.epoch == self.loader.epoch - 1 and not self.stream.consumed and self.loader.train
                and not live.dataset.offset)

    def dataset(self, pool: Optional["SlotPool"]) -> StreamEpoch:
        ld, st = self.loader, self.stream
        setup = StreamSetup(ld.seed, ld.rank, ld.world_size, ld.shuffle, ld.open_bins, ld.max_skip_fraction)
        self.board = ProbeBoard(self.probe_ids()) if self.probe_in_workers() else None
        return StreamEpoch(ld.pipeline, setup, ld.index_counts, ld.epoch, st.starts, st.progress,
                           st.consumed % self.roles, None if self.board else self.quotas(), pool, self.board,
                           self.whole_pass)

    def batch_bytes(self) -> Optional[int]:
        ld = self.loader
        # keep-aspect sizes would need every file's header read here: those batches take fresh segments
        per_image = None if ld.transform.keep_aspect else ld.bytes_per_image()
        if per_image is None:
            return None
        # the probe's mean when known (never probed for this), else half the uniform grid's tokens
        mean = self.mean or 0.5 * float(per_image.mean() - 16) / (3 * ld.cfg.patch_size ** 2 + 20)
        per_batch = ld.budget.max_images or int(np.ceil(ld.budget.max_tokens / max(1.0, mean * 0.7)))
        return int(per_image.max()) * per_batch

    def receive(self, item: TaggedBatch) -> tuple[object, bool]:
        """A worker's batch as ``(batch, the epoch's last)``: its state recorded, the carry-over counted."""
        batch = item.batch.to_batch() if isinstance(item.batch, WireBatch) else item.batch
        self.stream.record(item.role, item.state)
        quotas = self.quotas()
        last = quotas is not None and self.stream.consumed == sum(quotas)
        if last:
            ld = self.loader
            ld.stats.carried_over[ld.epoch] = self.carried_over()
            log.debug("epoch %d: %d sample visits of rank %d carry over into the next epoch", ld.epoch,
                      ld.stats.carried_over[ld.epoch], ld.rank)
        return batch, last

    def finish(self) -> None:
        if not self.loader.train:
            self.stream.consumed = 0

    def carried_over(self) -> int:
        """Sample visits of this rank's passes under way not yet emitted after the batches consumed so far
        (open batches, deferred, unread rest of the pass): they come in later epochs."""
        return self.stream.carried_over(self.partition_sizes(self.loader.rank))
