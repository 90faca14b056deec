"""`APTLoader`: a drop-in training/eval loader whose worker processes emit ready token-packed batches.

Two ways to fill a batch of ``max_tokens`` tokens (``packing``):

- **stream** (the default wherever token counts are not known up front: augmented training, image
  folders, datasets, thresholds other than an index's): every worker packs its own share of the
  samples by their *real* token counts, after decode, augmentation and patchify
  (`apt_data.stream`, `apt_data.worker.StreamEpoch`). Training epochs are a fixed number of
  batches per rank, known before the epoch starts and equal on every rank; no sample appears twice
  in an epoch, every sample once per pass, and samples not reached carry over into the next epoch.
  Evaluation (``train=False``) reads every sample exactly once per epoch.
- **plan** (the default when a shard index holds exact counts for this config and transform;
  `apt_data.planned`): each epoch is planned in every rank's main process from those counts, identically on all ranks
  (shuffle with ``(seed, epoch)``, `apt_data.binpack.pack_greedy`, `split_for_ranks`). Asked for
  explicitly without exact counts, it plans from uniform-grid upper bounds (batches then hold
  only the tokens APT keeps of that bound).

Either way a worker runs every sample through `apt_data.pipeline.SamplePipeline` (read -> transform
-> layout: `patchify`, the stored score maps, or a ``layout_fn``), packs the batch into one buffer and hands
it over through `apt_data.transport`. ``state_dict()`` / ``load_state_dict()`` resume an epoch
exactly where it stopped.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from .config import APTConfig
from .layout import PatchLayout
from .mixing import MixConfig
from .planned import iter_planned, plan_epoch, uniform_token_counts
from .pipeline import LayoutFn, LoaderStats, SamplePipeline, TooManySkipped, sample_seed
from .sources import Source, open_source
from .rank_stream import RankStream
from .stream import estimate_steps, partition, worker_quotas
from .transforms import ImageTransform
from .transport import SlotPool, WireBatch, take_pool
from .worker import StreamEpoch

log = logging.getLogger("apt_data.loader")

__all__ = ["APTLoader", "LayoutFn", "LoaderStats", "PACKINGS", "Source", "TooManySkipped", "open_source", "sample_seed"]

PACKINGS = ("auto", "stream", "plan")
STATE_VERSION = 1


class APTLoader:
    """Token-budget batches of APT-patchified images: yields ``(batch, targets)``.

    ``source``: a shard folder / ``index.parquet`` written by ``tools/make_shards.py``, webdataset
    shard URLs (brace notation), an image folder (ImageNet layout), a map-style dataset of
    ``(image, label)`` items (torchvision ``ImageFolder``, a Hugging Face split), or a `Source`.
    ``max_tokens``: tokens per batch, class/prefix tokens included; ``max_images``: optional cap.
    ``image_size``: default the shards' own size (their index), else 224.
    ``packing``: ``"stream"``, ``"plan"`` or ``"auto"`` (plan when an index gives exact counts).
    ``open_bins``: batches filled at once (default 8 when planning, 2 when streaming).
    ``steps_per_epoch``: batches per rank and epoch when streaming a training set (default: just
    under one pass, estimated from ``probe_samples`` samples run through the pipeline).
    ``static_shapes``: pad every batch to exactly ``max_tokens`` (torch.compile / CUDA graphs).
    ``rank``/``world_size``: default to torch.distributed's when it is initialised.
    ``strict``: raise on a bad sample instead of logging, counting and skipping it.
    ``max_skip_fraction``: more bad samples in an epoch than this share of the rank's samples (and
    more than 10) stop the epoch with `TooManySkipped`.
    ``layout_fn``: `LayoutFn` used instead of `patchify` (e.g. a baseline's layouts); with planned
    packing it must keep at most the image's APT token count (exactly that with an index).
    ``mix``: Mixup / CutMix (`apt_data.mixing.MixConfig`) of training samples, before patchify; the
    loader then yields timm's soft targets ``[B, num_classes]`` instead of labels.
    """

    def __init__(self, source: Any, cfg: Optional[APTConfig] = None, *, max_tokens: int,
                 max_images: Optional[int] = None, num_workers: int = 2, shuffle: Optional[bool] = None,
                 seed: int = 0, train: bool = True, transform: Optional[ImageTransform] = None,
                 image_size: Optional[int] = None, num_prefix_tokens: int = 1, static_shapes: bool = False,
                 open_bins: Optional[int] = None, strict: bool = False, pin_memory: Optional[bool] = None,
                 rank: Optional[int] = None, world_size: Optional[int] = None, prefetch_factor: int = 2,
                 start_step: int = 0, layout_fn: Optional[LayoutFn] = None, packing: str = "auto",
                 steps_per_epoch: Optional[int] = None, probe_samples: int = 256, max_skip_fraction: float = 0.01,
                 mix: Optional[MixConfig] = None):
        self.cfg = cfg or APTConfig()
        self.source: Source = open_source(source)
        stored = self.source.image_size_setting
        if transform is None:
            transform = ImageTransform(size=int(image_size or stored or 224), multiple=self.cfg.patch_size)
        self.transform = transform
        if self.transform.multiple % self.cfg.patch_size:
            raise ValueError(f"transform rounds sizes to {self.transform.multiple}, not a multiple of "
                             f"patch_size={self.cfg.patch_size}")
        if stored and not self.transform.augment and self.transform.size != stored:
            log.warning("%s: the shards hold %d-px images but this loader resizes them to %d px, so it cannot "
                        "use their exact token counts or stored scores; pass image_size=%d (--img-size %d) "
                        "to use them", getattr(self.source, "name", "source"), stored, self.transform.size,
                        stored, stored)
        if packing not in PACKINGS:
            raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
        self.max_tokens, self.max_images = int(max_tokens), max_images
        self.num_workers, self.seed, self.train = int(num_workers), int(seed), bool(train)
        self.shuffle = self.train if shuffle is None else bool(shuffle)
        self.num_prefix_tokens, self.static_shapes = int(num_prefix_tokens), bool(static_shapes)
        self.strict = bool(strict)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.prefetch_factor = prefetch_factor
        self.layout_fn = layout_fn
        self.mix = mix if mix is not None and mix.active else None
        if self.mix is not None and not self.train:
            raise ValueError("mix (Mixup / CutMix) is a training augmentation: not with train=False")
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
        mixing = self.mix is not None  # mixed images have their own token counts and scores
        self._exact = None if mixing else self.source.exact_token_counts(self.cfg, self.transform)
        self._scores = not mixing and self.source.stored_scores_usable(self.cfg, self.transform)
        self.packing = packing if packing != "auto" else ("plan" if self._exact is not None else "stream")
        self.open_bins = int(open_bins or (8 if self.packing == "plan" else 2))
        self._steps = None if steps_per_epoch is None else int(steps_per_epoch)
        if self._steps is not None and self._steps < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.probe_samples = int(probe_samples)
        self.max_skip_fraction = float(max_skip_fraction)
        self._epoch_skips: dict[int, int] = {}
        self._mean_tokens: Optional[float] = None
        self._bound: Optional[np.ndarray] = None
        self._pool: Optional[SlotPool] = None
        self._plan_cache: dict[int, list[np.ndarray]] = {}
        self._stream = RankStream(self.stream_workers)  # streamed packing: where this rank stands
        self._live = None  # (DataLoader, StreamEpoch, epoch) whose workers hold the end of that epoch
        smallest = (self.transform.size // self.cfg.max_patch_size) ** 2 if not self.transform.keep_aspect else 1
        if self.max_tokens < self.num_prefix_tokens + max(1, smallest):
            raise ValueError(f"max_tokens={self.max_tokens} cannot hold a single image "
                             f"({self.num_prefix_tokens} prefix + at least {max(1, smallest)} patch tokens)")

    def with_layout_fn(self, layout_fn: Optional[LayoutFn]) -> "APTLoader":
        """This loader with other layouts: the same samples per epoch, epoch and ``stats`` (skipped
        samples are counted in both), its own workers."""
        other = copy.copy(self)
        other.layout_fn, other._pool, other._plan_cache, other._live = layout_fn, None, dict(self._plan_cache), None
        other._stream = RankStream.from_dict(self._stream.as_dict())
        return other

    # ---------------------------------------------------------------- plan
    @property
    def exact_counts(self) -> bool:
        """True when batches are planned from exact token counts (the index matches this setup)."""
        return self.packing == "plan" and self._exact is not None

    @property
    def stream_workers(self) -> int:
        """Worker roles of a stream (the in-process loader plays one)."""
        return max(1, self.num_workers)

    def token_counts(self) -> np.ndarray:
        """Tokens per sample used for planning (exact, or the uniform-grid upper bound)."""
        if self._exact is not None:
            return self._exact + self.num_prefix_tokens
        return self._uniform_counts() + self.num_prefix_tokens

    def _uniform_counts(self) -> np.ndarray:
        """Uniform-grid patch tokens of every sample (an upper bound of its APT tokens)."""
        if self._bound is None:
            self._bound = uniform_token_counts(self.source, self.transform, self.cfg.patch_size)
        return self._bound

    def plan(self, epoch: int) -> list[np.ndarray]:
        """All ranks' bins for ``epoch`` (sample indices), identical on every rank (planned packing)."""
        if epoch not in self._plan_cache:
            self._plan_cache = {epoch: plan_epoch(self.token_counts(), self.source.keys, self.seed, epoch, self.shuffle,
                                                  self.max_tokens, self.max_images, self.open_bins, self.world_size)}
        return self._plan_cache[epoch]

    def rank_bins(self, epoch: Optional[int] = None) -> list[np.ndarray]:
        e = self.epoch if epoch is None else epoch
        return self.plan(e)[self.rank::self.world_size]

    def mean_tokens(self) -> float:
        """Mean tokens per sample (prefix included) of this loader's pipeline: the index's exact
        counts, else a deterministic probe of ``probe_samples`` samples (the same on every rank)."""
        if self._mean_tokens is None:
            if self._exact is not None:
                self._mean_tokens = float(self._exact.mean()) + self.num_prefix_tokens
            else:
                n = len(self.source)
                ids = np.random.default_rng([self.seed, 0x960BE]).choice(n, min(n, self.probe_samples), replace=False)
                self._mean_tokens = self.pipeline.mean_tokens(np.sort(ids))
        return self._mean_tokens

    def mean_images_per_batch(self) -> float:
        """Mean images per batch of this rank: planned batches' exact mean, or for streamed packing the
        budget filled to 99% with the probed mean tokens per sample (capped by ``max_images``)."""
        if self.packing == "plan":
            bins = self.rank_bins()
            return sum(len(b) for b in bins) / max(1, len(bins))
        per = self.max_tokens * 0.99 / self.mean_tokens()
        return float(min(per, self.max_images)) if self.max_images else float(per)

    def mean_images_source(self) -> str:
        """Where `mean_images_per_batch` comes from, for messages."""
        if self.packing == "plan":
            return "mean of the epoch's plan"
        if self._exact is not None:
            return "99% of the budget at the index's mean tokens per image"
        return f"99% of the budget at the mean tokens of {min(len(self.source), self.probe_samples)} probed samples"

    def steps_per_epoch(self) -> int:
        """Batches per rank in a full epoch (streamed training: fixed; otherwise this epoch's)."""
        if self.packing == "plan":
            return len(self.rank_bins())
        if self._steps is None:
            n, W = len(self.source), self.stream_workers
            sizes = [len(partition(n, self.seed, r, self.world_size, w, W, self.shuffle))
                     for r in range(self.world_size) for w in range(W)]
            if not self.train:  # one pass per worker, its last batch partial: an estimate
                per = self.max_tokens * 0.99 / self.mean_tokens()
                if self.max_images:
                    per = min(per, self.max_images)
                return sum(int(np.ceil(sizes[self.rank * W + w] / per)) for w in range(W))
            self._steps = estimate_steps(sizes, self.mean_tokens(), self.max_tokens, self.max_images, W,
                                         self.open_bins)
        return self._steps

    def __len__(self) -> int:
        """Batches this rank yields in the rest of the current epoch (an estimate for streamed evaluation)."""
        if self.packing == "plan":
            return max(0, len(self.rank_bins()) - self.start_step)
        steps = self.steps_per_epoch()
        if self.train and self._stream.consumed >= steps:  # done: iterating again starts the next epoch
            return steps
        return max(0, steps - self._stream.consumed)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``. A streamed epoch follows on from the one before it (its carried-over
        samples); an epoch reached otherwise starts its stream afresh at pass ``epoch``."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self.start_step = 0
        self.epoch = epoch
        if self.packing == "plan" or epoch == self._stream.epoch:
            return
        if epoch == self._stream.epoch + 1 and self.train:
            self._stream.follow()
        else:
            self._stream.restart(epoch)
        if self._live is not None and self._live[2] != epoch - 1:
            self._drop_live()

    def resume(self, epoch: int, step: int) -> None:
        """Continue ``epoch`` at batch ``step`` (planned packing; streams resume from `state_dict`)."""
        if self.packing != "plan" and (int(epoch), int(step)) != (self._stream.epoch, self._stream.consumed):
            raise ValueError("a streamed loader resumes from its state_dict(), not from (epoch, step)")
        self.epoch, self.start_step = int(epoch), int(step)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Where this rank's loader stands, for `load_state_dict` (plain types: JSON- and torch.save-able)."""
        d = {"version": STATE_VERSION, "packing": self.packing, "epoch": self.epoch, "step": int(self.start_step),
             "seed": self.seed, "world_size": self.world_size, "rank": self.rank, "num_workers": self.num_workers,
             "num_samples": len(self.source)}
        if self.packing != "plan":
            d.update(steps_per_epoch=self._steps, **self._stream.as_dict())
        return d

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the loader that wrote ``state`` stood (same data, seed, world size,
        number of workers; raises ValueError naming what differs)."""
        for k, mine in (("packing", self.packing), ("seed", self.seed), ("world_size", self.world_size),
                        ("rank", self.rank), ("num_workers", self.num_workers), ("num_samples", len(self.source))):
            if state.get(k) != mine:
                raise ValueError(f"loader state is for {k}={state.get(k)!r}, this loader has {k}={mine!r}")
        self._drop_live()
        self.epoch = int(state["epoch"])
        if self.packing == "plan":
            self.start_step = int(state["step"])
            return
        self._steps = state["steps_per_epoch"]
        self._stream = RankStream.from_dict(state)

    def _drop_live(self) -> None:
        if self._live is not None:
            it = self._live[3]
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            if self._live[4] is not None:
                self._live[4].busy = False
            self._live = None

    def carried_over(self) -> int:
        """Sample visits of this rank's passes under way not yet emitted after the batches consumed so far
        (open batches, deferred, unread rest of the pass): they come in later epochs."""
        n, W = len(self.source), self.stream_workers
        return self._stream.carried_over([len(partition(n, self.seed, self.rank, self.world_size, role, W,
                                                        self.shuffle)) for role in range(W)])

    # ---------------------------------------------------------------- iterate
    def __iter__(self) -> Iterator[tuple]:
        if self.packing == "plan":
            yield from iter_planned(self)
        else:
            yield from self._iter_stream()

    def _iter_stream(self) -> Iterator[tuple]:
        from . import warmup

        W = self.stream_workers
        quotas = worker_quotas(self.steps_per_epoch(), W) if self.train else None
        if not self.train and self._stream.consumed == 0:  # evaluation: every epoch is one fresh pass
            self._stream.restart(self.epoch)
        if quotas is not None and self._stream.consumed >= sum(quotas):  # this epoch is done: go on to the next
            self.set_epoch(self.epoch + 1)
        live = self._live
        # a kept DataLoader's workers play the roles they were given: reusable when they start at role 0
        if live is not None and (live[2] != self.epoch - 1 or self._stream.consumed or not self.train
                                 or live[1].offset):
            self._drop_live()
            live = None
        if live is not None:
            dl, data, _, _, pool = live
            self._live = None
        else:
            pool = None
            if self.num_workers > 0:
                warmup()
                # keep-aspect sizes would need every file's header read here: those batches take fresh segments
                per_image = None if self.transform.keep_aspect else self._uniform_per_image()
                if per_image is not None:
                    per_batch = self.max_images or int(np.ceil(self.max_tokens / max(1.0, self.mean_tokens() * 0.7)))
                    pool = self._take_pool(int(per_image.max()) * per_batch)
            st = self._stream
            data = StreamEpoch(self, self.epoch, st.starts, st.progress, st.consumed % W, quotas, pool)
            kw = dict(prefetch_factor=self.prefetch_factor, persistent_workers=self.train) if self.num_workers else {}
            dl = DataLoader(data, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory, **kw)
        it = iter(dl)
        try:
            for item in it:
                batch = item.batch.to_batch() if isinstance(item.batch, WireBatch) else item.batch
                self._stream.record(item.role, item.state)
                if quotas is not None and self._stream.consumed == sum(quotas):
                    # the epoch's last batch: its workers (and what they hold) serve the next epoch,
                    # whether or not the caller asks this iterator for more
                    self.stats.carried_over[self.epoch] = self.carried_over()
                    log.debug("epoch %d: %d sample visits of rank %d carry over into the next epoch", self.epoch,
                             self.stats.carried_over[self.epoch], self.rank)
                    self._live = (dl, data, self.epoch, it, pool)
                yield self._account(batch), self._targets(batch)
            if quotas is None:
                self._stream.consumed = 0
        finally:
            if self._live is None or self._live[3] is not it:  # not kept for the next epoch: stop its workers
                shutdown = getattr(it, "_shutdown_workers", None)
                if shutdown is not None:
                    shutdown()
                if pool is not None:
                    pool.busy = False

    def _account(self, batch):
        for key, reason in zip(batch.skipped, batch.skip_reasons):
            self.stats.skipped[reason] += 1
            self.stats.skipped_keys.append(key)
        if batch.skipped:
            n = self._epoch_skips[self.epoch] = self._epoch_skips.get(self.epoch, 0) + len(batch.skipped)
            share = len(self.source) / self.world_size
            if n > max(10, self.max_skip_fraction * share):
                raise TooManySkipped(
                    f"{n} bad samples skipped in epoch {self.epoch} of rank {self.rank}, more than "
                    f"{self.max_skip_fraction:.1%} of its {share:.0f} samples (reasons so far: "
                    f"{dict(self.stats.skipped)}; last: {batch.skipped[-1]}); fix the data, or raise "
                    "max_skip_fraction (--max-skip-fraction)")
        return batch

    def _uniform_per_image(self) -> Optional[np.ndarray]:
        """Bytes of each sample in a batch buffer at its uniform-grid bound (None: sizes unknown)."""
        try:
            uniform = self._uniform_counts()
        except ValueError:
            return None
        p = self.cfg.patch_size
        # every pixel once (3 bytes), <= one token per base cell (20 bytes of coordinates and
        # positions), per-image offsets and labels
        return uniform * (3 * p * p + 20) + 16

    def _take_pool(self, batch_bytes: Optional[int]) -> Optional[SlotPool]:
        """The slot pool for an iteration with forked workers (the last one when idle and large enough)."""
        pool = take_pool(self._pool, self.num_workers, self.prefetch_factor,
                         batch_bytes and int(batch_bytes) + 16 + 64 * (3 * self.cfg.num_scales + 3))
        if pool is not None and (self._pool is None or not self._pool.busy):
            self._pool = pool
        if pool is not None:
            pool.busy = True
        return pool

    # ---------------------------------------------------------------- one sample
    @property
    def pipeline(self) -> SamplePipeline:
        """The per-sample pipeline this loader's workers run (`apt_data.pipeline`)."""
        return SamplePipeline(self.source, self.cfg, self.transform, self.seed, self.layout_fn, self._scores,
                              self.num_prefix_tokens, self.max_tokens, self.static_shapes, self.strict, self.mix)

    def load_sample(self, i: int, epoch: int) -> tuple[np.ndarray, PatchLayout]:
        """Sample ``i`` through this loader's pipeline: ``(image, layout)`` (see `SamplePipeline.load`)."""
        return self.pipeline.load(i, epoch)[:2]

    def _targets(self, batch):
        """What the loader yields beside a batch: its labels, or with ``mix`` timm's soft targets."""
        if self.mix is None or batch.labels is None:
            return batch.labels
        return batch.soft_targets(self.mix.num_classes, self.mix.label_smoothing)
