"""`APTLoader`: a drop-in training/eval loader whose worker processes emit ready token-packed batches.

Each epoch is planned up front in every rank's main process, identically on all ranks:

1. the samples are shuffled with ``(seed, epoch)``;
2. their token counts (class/prefix tokens included) are packed greedily into bins of at most
   ``max_tokens`` (`apt_data.binpack.pack_greedy`);
3. the bins are made a multiple of the world size (`split_for_ranks`) and dealt round-robin to
   ranks, then to worker processes.

Every sample is therefore read exactly once per epoch across ranks and workers, every rank yields
the same number of batches (no DDP hang), an epoch is a pure function of ``(seed, epoch)``, and a
run resumes at any step by dropping the batches already done.

Token counts come from the Parquet index of shards written by ``tools/make_shards.py`` when the
index was made with the same `APTConfig` and transform (exact: batches are >= 99% full). Otherwise
(image folders, augmented training, a different config) each image's uniform-grid token count is
used, an upper bound since APT never adds tokens: batches never overflow, and they then hold the
real tokens only (or padding with ``static_shapes``).

Worker processes pack each batch into one buffer (`apt_data.packing.BatchSpec`): a slot of a
shared-memory pool mapped once before the workers fork (`_SlotPool`), from which the main process
copies it out, so no batch pays for a shared-memory segment of its own.
"""
from __future__ import annotations

import itertools
import logging
import mmap
import multiprocessing
import os
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .binpack import pack_greedy, split_for_ranks
from .config import APTConfig
from .layout import layout_from_flat_scores, patchify
from .transforms import ImageTransform

log = logging.getLogger("apt_data.loader")


# --------------------------------------------------------------------------------------- sources
class Source:
    """Random-access samples: ``keys``, int64 ``labels``, ``read(i) -> encoded bytes``."""

    keys: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, i: int) -> bytes:
        raise NotImplementedError

    def read_record(self, i: int):
        """``(encoded bytes, record or None)``; a record may carry precomputed score maps."""
        return self.read(i), None

    def read_scores(self, i: int):
        """``(encoded bytes, stored flat score maps or None)``: what the loader needs of a sample."""
        data, record = self.read_record(i)
        return data, (record.scores if record is not None else None)

    def image_size(self, i: int) -> Optional[tuple[int, int]]:
        """(width, height) of the stored image when known without decoding, else None."""
        return None

    def exact_token_counts(self, cfg: APTConfig, transform: ImageTransform) -> Optional[np.ndarray]:
        """Patch tokens per sample (prefix tokens excluded) if known exactly for this setup."""
        return None


class FolderSource(Source):
    """An ImageNet-layout folder: one sub-folder per class, classes sorted -> labels 0..C-1."""

    def __init__(self, root: Union[str, os.PathLike]):
        from .shards import list_image_folder

        self.root = Path(root)
        items = list_image_folder(self.root)
        if not items:
            raise ValueError(f"{root}: no images found (expected ImageNet layout: ROOT/<class>/<image>)")
        self.paths = [p for p, _, _ in items]
        self.classes = sorted({c for _, _, c in items})
        self.keys = [f"{p.parent.name}/{p.name}" for p in self.paths]
        self.labels = np.asarray([label for _, label, _ in items], np.int64)

    def read(self, i: int) -> bytes:
        return self.paths[i].read_bytes()

    def image_size(self, i: int) -> Optional[tuple[int, int]]:
        from PIL import Image
        try:
            with Image.open(self.paths[i]) as im:
                return im.size
        except Exception:
            return None


def open_source(source: Union[str, os.PathLike, Source]) -> Source:
    """A `Source` for a shard folder (``shards`` or ``shards:val``), a Parquet index, a shard URL
    pattern (``shards/train-{000000..000003}.tar``, with an index beside it) or an image folder."""
    if isinstance(source, Source):
        return source
    from . import shard_source  # local import: shards are optional for folder users

    s = str(source)
    src = shard_source.try_open(s)
    if src is not None:
        return src
    if os.path.isdir(s):
        return FolderSource(s)
    raise ValueError(f"{s}: not a shard folder, Parquet index, shard pattern or image folder")


# ------------------------------------------------------------------------------------- planning
def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of one sample's random augmentation: independent of worker and rank."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


@dataclass
class LoaderStats:
    """What the loader skipped, with reasons (bad files are logged, counted and skipped)."""

    skipped: Counter = field(default_factory=Counter)
    skipped_keys: list = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


class _PlannedBins(IterableDataset):
    """Worker side: turns this rank's planned bins into batches (`_WireBatch` in a worker process)."""

    def __init__(self, loader: "APTLoader", bins: list[np.ndarray], epoch: int, exact: Optional[np.ndarray],
                 pool: Optional["_SlotPool"] = None):
        self.loader, self.bins, self.epoch, self.exact, self.pool = loader, bins, epoch, exact, pool

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for b in self.bins[wid::nw]:
            yield self.loader._build_batch(b, self.epoch, self.exact, pool=self.pool)


# ------------------------------------------------------------------------------ batch transport
_POOLS: "weakref.WeakValueDictionary[int, _SlotPool]" = weakref.WeakValueDictionary()
_POOL_IDS = itertools.count()


class _SlotPool:
    """Shared-memory slots that forked DataLoader workers pack batches into, reused batch after batch.

    Why: a fresh shared-memory segment per batch (what a worker gets from `torch` by default, and
    what ``default_collate`` uses) costs more CPU than building the batch: creating it, faulting in
    every page, passing its descriptor, mapping it in the main process, tearing it down. The parent
    maps the slots once, before the workers fork; a worker packs into one of its own free slots and
    sends only the `BatchSpec` and the slot number; the main process copies the bytes out (straight
    into pinned memory when pinning) and hands the slot back through that worker's pipe. A worker
    with no free slot, or a batch larger than a slot, falls back to a fresh segment (same result).
    """

    def __init__(self, num_workers: int, slots: int, slot_bytes: int):
        self.num_workers, self.slots, self.slot_bytes = int(num_workers), int(slots), int(slot_bytes)
        self.busy = False
        self._mm = mmap.mmap(-1, self.num_workers * self.slots * self.slot_bytes)  # anonymous, MAP_SHARED
        self.buf = np.frombuffer(self._mm, np.uint8)
        self._pipes = [os.pipe() for _ in range(self.num_workers)]  # free slot numbers, one pipe per worker
        for r, _ in self._pipes:
            os.set_blocking(r, False)
        self.id = next(_POOL_IDS)
        _POOLS[self.id] = self
        self._owner = os.getpid()

    def reset(self) -> None:
        """Every slot free (call only while no worker of this pool runs)."""
        for r, w in self._pipes:
            try:
                while os.read(r, 4096):
                    pass
            except BlockingIOError:
                pass
            os.write(w, bytes(range(self.slots)))

    def acquire(self, worker: int, nbytes: int) -> Optional[int]:
        """A free slot of ``worker`` for ``nbytes`` (in the worker), or None."""
        if nbytes > self.slot_bytes or not 0 <= worker < self.num_workers:
            return None
        try:
            b = os.read(self._pipes[worker][0], 1)
        except BlockingIOError:
            return None
        return b[0] if b else None

    def release(self, worker: int, slot: int) -> None:
        os.write(self._pipes[worker][1], bytes([slot]))

    def view(self, worker: int, slot: int, nbytes: int) -> np.ndarray:
        base = (worker * self.slots + slot) * self.slot_bytes
        return self.buf[base:base + nbytes]

    def __reduce__(self):  # a spawned (not forked) worker cannot share the mapping: it gets no pool
        return (_no_pool, ())

    def __del__(self):
        if getattr(self, "_owner", None) == os.getpid():
            for r, w in getattr(self, "_pipes", ()):
                for fd in (r, w):
                    try:
                        os.close(fd)
                    except OSError:
                        pass


def _no_pool():
    return None


def _host_buffer(nbytes: int, pin: bool):
    """Where the main process copies a batch out of its slot (page-locked when pinning)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)


class _WireBatch:
    """What a worker sends for one batch: its `BatchSpec` and its bytes, in a pool slot or a tensor.

    The main process (or the DataLoader's pin-memory thread, through `pin_memory`) turns it into
    a `PackedBatch` whose tensors are views of one private (or pinned) buffer.
    """

    def __init__(self, spec, pool_id: Optional[int] = None, worker: int = 0, slot: int = 0, data=None):
        self.spec, self.pool_id, self.worker, self.slot, self.data = spec, pool_id, worker, slot, data

    def _bytes(self, pin: bool = False):
        if self.data is not None:
            return self.data.pin_memory() if pin else self.data
        pool = _POOLS[self.pool_id]
        out = _host_buffer(self.spec.nbytes, pin)
        # a NumPy copy: one thread (torch would wake its intra-op pool, which then spins on the cores
        # the workers need)
        np.copyto(out.numpy(), pool.view(self.worker, self.slot, self.spec.nbytes))
        pool.release(self.worker, self.slot)
        self.pool_id, self.data = None, out
        return out

    def pin_memory(self) -> "_WireBatch":
        return _WireBatch(self.spec, data=self._bytes(pin=True))

    def to_batch(self):
        return self.spec.to_batch(self._bytes())


class APTLoader:
    """Token-budget batches of APT-patchified images: yields ``(batch, targets)``.

    ``source``: a shard folder / ``index.parquet`` written by ``tools/make_shards.py``, webdataset
    shard URLs (brace notation), or an image folder (ImageNet layout), or a `Source`.
    ``max_tokens``: tokens per batch, class/prefix tokens included; ``max_images``: optional cap.
    ``static_shapes``: pad every batch to exactly ``max_tokens`` (torch.compile / CUDA graphs).
    ``rank``/``world_size``: default to torch.distributed's when it is initialised.
    ``strict``: raise on a bad sample instead of logging, counting and skipping it.
    """

    def __init__(self, source, cfg: Optional[APTConfig] = None, *, max_tokens: int, max_images: Optional[int] = None,
                 num_workers: int = 2, shuffle: Optional[bool] = None, seed: int = 0, train: bool = True,
                 transform: Optional[ImageTransform] = None, image_size: int = 224, num_prefix_tokens: int = 1,
                 static_shapes: bool = False, open_bins: int = 8, strict: bool = False,
                 pin_memory: Optional[bool] = None, rank: Optional[int] = None, world_size: Optional[int] = None,
                 prefetch_factor: int = 2, start_step: int = 0):
        self.cfg = cfg or APTConfig()
        self.source = open_source(source)
        self.transform = transform or ImageTransform(size=image_size, multiple=self.cfg.patch_size)
        if self.transform.multiple % self.cfg.patch_size:
            raise ValueError(f"transform rounds sizes to {self.transform.multiple}, not a multiple of "
                             f"patch_size={self.cfg.patch_size}")
        self.max_tokens, self.max_images = int(max_tokens), max_images
        self.num_workers, self.seed, self.train = int(num_workers), int(seed), bool(train)
        self.shuffle = self.train if shuffle is None else bool(shuffle)
        self.num_prefix_tokens, self.static_shapes = int(num_prefix_tokens), bool(static_shapes)
        self.open_bins, self.strict = int(open_bins), bool(strict)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.prefetch_factor = prefetch_factor
        if rank is None or world_size is None:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
            else:
                rank, world_size = 0, 1
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch, self.start_step = 0, int(start_step)
        self.stats = LoaderStats()
        self._exact = self.source.exact_token_counts(self.cfg, self.transform)
        self._bound: Optional[np.ndarray] = None
        self._pool: Optional[_SlotPool] = None
        self._plan_cache: dict[int, list[np.ndarray]] = {}
        smallest = (self.transform.size // self.cfg.max_patch_size) ** 2 if not self.transform.keep_aspect else 1
        if self.max_tokens < self.num_prefix_tokens + max(1, smallest):
            raise ValueError(f"max_tokens={self.max_tokens} cannot hold a single image "
                             f"({self.num_prefix_tokens} prefix + at least {max(1, smallest)} patch tokens)")

    # ---------------------------------------------------------------- plan
    @property
    def exact_counts(self) -> bool:
        """True when batches are planned from exact token counts (the index matches this setup)."""
        return self._exact is not None

    def token_counts(self) -> np.ndarray:
        """Tokens per sample used for planning (exact, or the uniform-grid upper bound)."""
        if self._exact is not None:
            return self._exact + self.num_prefix_tokens
        return self._uniform_counts() + self.num_prefix_tokens

    def _uniform_counts(self) -> np.ndarray:
        """Uniform-grid patch tokens of every sample (an upper bound of its APT tokens)."""
        if self._bound is None:
            p = self.cfg.patch_size
            if self.transform.keep_aspect:
                bound = np.empty(len(self.source), np.int64)
                for i in range(len(self.source)):
                    wh = self.source.image_size(i)
                    if wh is None:
                        raise ValueError(f"{self.source.keys[i]}: cannot read the image size to plan batches")
                    h, w = self.transform.output_size(*wh)
                    bound[i] = (h // p) * (w // p)
            else:
                bound = np.full(len(self.source), (self.transform.size // p) ** 2, np.int64)
            self._bound = bound
        return self._bound

    def plan(self, epoch: int) -> list[np.ndarray]:
        """All ranks' bins for ``epoch`` (sample indices), identical on every rank."""
        if epoch not in self._plan_cache:
            counts = self.token_counts()
            order = (np.random.default_rng([self.seed, epoch]).permutation(len(counts)) if self.shuffle
                     else np.arange(len(counts)))
            bins = pack_greedy(counts[order], self.max_tokens, self.max_images, self.open_bins,
                               names=[self.source.keys[i] for i in order])
            self._plan_cache = {epoch: split_for_ranks([order[b] for b in bins], self.world_size)}
        return self._plan_cache[epoch]

    def rank_bins(self, epoch: Optional[int] = None) -> list[np.ndarray]:
        e = self.epoch if epoch is None else epoch
        return self.plan(e)[self.rank::self.world_size]

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch (after ``start_step`` for a resumed run)."""
        return max(0, len(self.rank_bins()) - self.start_step)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` (a pending `resume` step is kept only for the epoch it was given for)."""
        if int(epoch) != self.epoch:
            self.start_step = 0
        self.epoch = int(epoch)

    def resume(self, epoch: int, step: int) -> None:
        """Continue ``epoch`` at batch ``step`` (batches already done are not read again)."""
        self.epoch, self.start_step = int(epoch), int(step)

    def fill(self, epoch: Optional[int] = None) -> float:
        """Planned real tokens / budget over this rank's batches (prefix tokens count as real)."""
        counts = self.token_counts()
        bins = self.rank_bins(epoch)
        return float(sum(counts[b].sum() for b in bins) / (len(bins) * self.max_tokens)) if bins else 0.0

    # ---------------------------------------------------------------- iterate
    def __iter__(self) -> Iterator[tuple]:
        from . import warmup

        bins = self.rank_bins()[self.start_step:]
        if self.num_workers == 0:
            dl = DataLoader(_PlannedBins(self, bins, self.epoch, self._exact), batch_size=None, num_workers=0,
                            pin_memory=self.pin_memory)
            for batch in dl:
                yield self._account(batch), batch.labels
            self.start_step = 0  # a resumed epoch continues once; iterating again starts it from 0
            return
        warmup()  # compiled kernels are inherited by forked workers
        pool = self._take_pool(bins)
        dl = DataLoader(_PlannedBins(self, bins, self.epoch, self._exact, pool), batch_size=None,
                        num_workers=self.num_workers, pin_memory=self.pin_memory,
                        prefetch_factor=self.prefetch_factor, persistent_workers=False)
        it = iter(dl)
        try:
            for item in it:
                batch = item.to_batch() if isinstance(item, _WireBatch) else item
                yield self._account(batch), batch.labels
            self.start_step = 0
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()  # no worker may still write into the pool when it is handed out again
                if pool is not None:
                    pool.busy = False

    def _account(self, batch):
        for key, reason in zip(batch.skipped, batch.skip_reasons):
            self.stats.skipped[reason] += 1
            self.stats.skipped_keys.append(key)
        return batch

    def _take_pool(self, bins: list[np.ndarray]) -> Optional[_SlotPool]:
        """The slot pool for an iteration with forked workers (the last one when idle and large enough)."""
        method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
        if method != "fork" or not bins:  # (asking this way does not fix the start method)
            return None
        try:
            uniform = self._uniform_counts()
        except ValueError:
            return None  # sizes unknown: every batch gets its own segment
        p, S = self.cfg.patch_size, self.cfg.num_scales
        # bytes of a batch: every pixel once (3 bytes), <= one token per base cell (20 bytes of
        # coordinates and positions), per-image offsets and labels, alignment of 3S + 2 arrays
        per_image = uniform * (3 * p * p + 20) + 16
        need = int(max(per_image[b].sum() for b in bins)) + 16 + 64 * (3 * S + 3)
        slots = min(255, max(2, int(self.prefetch_factor or 2) + 1))  # slot numbers travel as one byte
        pool = self._pool
        if (pool is None or pool.busy or pool.slot_bytes < need or pool.num_workers != self.num_workers
                or pool.slots != slots):
            pool = _SlotPool(self.num_workers, slots, need)
            if self._pool is None or not self._pool.busy:
                self._pool = pool
        pool.reset()
        pool.busy = True
        return pool

    def _build_batch(self, sample_ids: np.ndarray, epoch: int, exact: Optional[np.ndarray],
                     pool: Optional[_SlotPool] = None):
        """Read, decode, patchify and pack one planned bin: a `PackedBatch`, or in a worker process
        a `_WireBatch` (into a pool slot when one is free)."""
        from .packing import fill_batch, new_buffer, prepare_batch

        images, layouts, labels, keys, skipped, reasons = [], [], [], [], [], []
        for i in sample_ids.tolist():
            key = self.source.keys[i]
            try:
                if exact is not None:
                    data, scores = self.source.read_scores(i)
                else:
                    data, scores = self.source.read(i), None
                img = self.transform(data, name=key,
                                     seed=sample_seed(self.seed, epoch, i) if self.transform.augment else 0)
                if scores is not None:
                    # deterministic transform of the stored image: reuse the stored score maps
                    layout = layout_from_flat_scores(scores, img.shape[:2], self.cfg)
                else:
                    layout = patchify(img, self.cfg)
            except (ValueError, OSError) as e:
                if self.strict:
                    raise ValueError(f"sample {key}: {e}") from e
                log.warning("skipping sample %s: %s", key, e)
                skipped.append(key)
                reasons.append(type(e).__name__ if not str(e) else _reason(e))
                continue
            if exact is not None and len(layout) != exact[i]:
                raise RuntimeError(f"sample {key}: the index says {exact[i]} tokens but patchify gives "
                                   f"{len(layout)}; the index was made with a different config or transform")
            images.append(img)
            layouts.append(layout)
            labels.append(int(self.source.labels[i]))
            keys.append(key)
        real = sum(len(l) for l in layouts) + self.num_prefix_tokens * len(layouts)
        if real > self.max_tokens:
            raise RuntimeError(f"batch of {keys} needs {real} tokens > max_tokens={self.max_tokens} (planning bug)")
        pad = self.max_tokens - real if self.static_shapes else 0
        spec, images, layouts, labels = prepare_batch(images, self.cfg, labels, self.num_prefix_tokens, layouts, pad,
                                                      keys=keys, skipped=skipped, skip_reasons=reasons)
        info = get_worker_info()
        if info is None:
            data = new_buffer(spec.nbytes, shared=False)
            fill_batch(spec, images, layouts, labels, data.numpy())
            return spec.to_batch(data)
        slot = pool.acquire(info.id, spec.nbytes) if pool is not None else None
        if slot is None:
            data = new_buffer(spec.nbytes, shared=True)
            fill_batch(spec, images, layouts, labels, data.numpy())
            return _WireBatch(spec, data=data)
        try:
            fill_batch(spec, images, layouts, labels, pool.view(info.id, slot, spec.nbytes))
        except BaseException:
            pool.release(info.id, slot)
            raise
        return _WireBatch(spec, pool.id, info.id, slot)


def _reason(e: Exception) -> str:
    msg = str(e)
    for tag in ("0 bytes", "not an image", "truncated", "cannot decode"):
        if tag in msg:
            return tag
    return type(e).__name__
