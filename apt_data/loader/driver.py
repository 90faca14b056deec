"""`APTLoader`: a drop-in training/eval loader whose worker processes emit ready token-packed batches.

The driver owns what both packing strategies share (settings, workers and their lifetime, the slot
pool, skip accounting, saved state); how batches are filled is the strategy: ``stream``
(`apt_data.loader.streamed`, real token counts packed in each worker) or ``plan``
(`apt_data.loader.planned`, epochs planned from an index's exact counts). See docs/loader.md.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from ..config import APTConfig, SettingError, TokenBudget
from ..layout import PatchLayout
from ..mixing import MixConfig
from ..pipeline import LayoutFn, LoaderStats, SamplePipeline, SkipLimit, TooManySkipped
from ..scoring.warmup import warmup
from ..sources import Source, open_source
from ..transforms import ImageTransform
from ..transport import SlotPool, take_pool
from .planned import PlannedPacking, plan_epoch, uniform_token_counts
from .streamed import StreamedPacking

log = logging.getLogger("apt_data.loader")

STRATEGIES = {"stream": StreamedPacking, "plan": PlannedPacking}  # how batches are filled (``packing``)
PACKINGS = ("auto", "stream", "plan")
STATE_VERSION = 1


@dataclass
class LiveWorkers:
    """An iteration's DataLoader kept after the epoch's last batch (its workers hold the next epoch)."""

    dataloader: DataLoader
    dataset: IterableDataset
    epoch: int
    iterator: Iterator
    pool: Optional[SlotPool]

    def stop(self) -> None:
        """Stop the workers, then free the slot pool (no worker writes into it any more)."""
        shutdown = getattr(self.iterator, "_shutdown_workers", None)  # torch's DataLoader iterator
        if shutdown is not None:
            shutdown()
        if self.pool is not None:
            self.pool.busy = False


class APTLoader:
    """Token-budget batches of APT-patchified images: yields ``(batch, targets)`` (docs/loader.md).

    ``source``: shards, webdataset URLs, an image folder, a map-style dataset or a `Source`.
    ``max_tokens`` (prefix tokens included), ``max_images``: the batch budget (`TokenBudget`).
    ``packing``: ``"stream"``, ``"plan"`` or ``"auto"`` (plan when an index gives exact counts).
    ``steps_per_epoch``: streamed training's batches per epoch (default: estimated from
    ``probe_samples``). ``strict``: raise on a bad sample instead of skipping it;
    ``max_skip_fraction``: more skips than this share stop the epoch (`TooManySkipped`).
    ``layout_fn`` replaces `patchify`; ``mix`` (Mixup / CutMix) makes targets soft.
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
        self.budget = TokenBudget(max_tokens, max_images, num_prefix_tokens, static_shapes)
        self.source: Source = open_source(source)
        self.transform = self._transform(transform, image_size)
        if packing not in PACKINGS:
            raise SettingError(f"packing must be one of {PACKINGS}, got {packing!r}", "packing")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise SettingError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}", "steps_per_epoch")
        self.num_workers, self.seed, self.train = int(num_workers), int(seed), bool(train)
        self.shuffle = self.train if shuffle is None else bool(shuffle)
        self.strict = bool(strict)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.prefetch_factor = prefetch_factor
        self.layout_fn = layout_fn
        self.mix = mix if mix is not None and mix.active else None
        if self.mix is not None and not self.train:
            raise SettingError("mix (Mixup / CutMix) is a training augmentation: not with train=False", "mix")
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self.epoch = 0
        self.stats = LoaderStats()
        mixing = self.mix is not None  # mixed images have their own token counts and scores
        self._exact = None if mixing else self.source.exact_token_counts(self.cfg, self.transform)
        self._scores = not mixing and self.source.stored_scores_usable(self.cfg, self.transform)
        kind = STRATEGIES[packing if packing != "auto" else "plan" if self._exact is not None else "stream"]
        self.open_bins = int(open_bins or kind.default_open_bins)
        self.probe_samples = int(probe_samples)
        self.max_skip_fraction = float(max_skip_fraction)
        self._epoch_skips: dict[int, int] = {}
        self._bad: set[str] = set()  # keys of the samples skipped as bad so far
        self._bound: Optional[np.ndarray] = None
        self._pool: Optional[SlotPool] = None
        self._plans: dict[int, list[np.ndarray]] = {}
        self._live: Optional[LiveWorkers] = None
        self.strategy = kind(self, start_step=start_step, steps=steps_per_epoch)
        smallest = (self.transform.size // self.cfg.max_patch_size) ** 2 if not self.transform.keep_aspect else 1
        self.budget.check_image_fits(smallest)

    def _transform(self, transform: Optional[ImageTransform], image_size: Optional[int]) -> ImageTransform:
        stored = self.source.image_size_setting
        if transform is None:
            transform = ImageTransform(size=int(image_size or stored or 224), multiple=self.cfg.patch_size)
        if transform.multiple % self.cfg.patch_size:
            raise SettingError(f"transform rounds sizes to {transform.multiple}, not a multiple of "
                               f"patch_size={self.cfg.patch_size}", "transform")
        if stored and not transform.augment and transform.size != stored:
            log.warning("%s: the shards hold %d-px images but this loader resizes them to %d px, so it cannot "
                        "use their exact token counts or stored scores; pass image_size=%d to use them",
                        getattr(self.source, "name", "source"), stored, transform.size, stored)
        return transform

    def with_layout_fn(self, layout_fn: Optional[LayoutFn]) -> "APTLoader":
        """This loader with other layouts: the same samples, epoch and ``stats``, its own workers."""
        other = copy.copy(self)
        other.layout_fn, other._pool, other._plans, other._live = layout_fn, None, dict(self._plans), None
        other.strategy = self.strategy.clone(other)
        return other

    # ---------------------------------------------------------------- settings, as read by the strategies
    max_tokens = property(lambda self: self.budget.max_tokens)
    max_images = property(lambda self: self.budget.max_images)
    num_prefix_tokens = property(lambda self: self.budget.num_prefix_tokens)
    static_shapes = property(lambda self: self.budget.static_shapes)

    @property
    def packing(self) -> str:
        """``"plan"`` or ``"stream"``: the strategy's name (for messages; `describe` says more)."""
        return self.strategy.name

    @property
    def index_counts(self) -> Optional[np.ndarray]:
        """The index's exact patch tokens per sample for this config and transform (None: not known)."""
        return self._exact

    @property
    def exact_counts(self) -> bool:
        """True when batches are planned from exact token counts (the index matches this setup)."""
        return self.strategy.plans_from_index

    @property
    def pipeline(self) -> SamplePipeline:
        """The per-sample pipeline this loader's workers run (`apt_data.pipeline`)."""
        return SamplePipeline(self.source, self.cfg, self.transform, self.seed, self.layout_fn, self._scores,
                              self.budget, self.strict, self.mix)

    def load_sample(self, i: int, epoch: int) -> tuple[np.ndarray, PatchLayout]:
        """Sample ``i`` through this loader's pipeline: ``(image, layout)`` (see `SamplePipeline.load`)."""
        return self.pipeline.load(i, epoch)[:2]

    # ---------------------------------------------------------------- sizes
    def token_counts(self) -> np.ndarray:
        """Tokens per sample used for planning (exact, or the uniform-grid upper bound), prefix included."""
        return (self._exact if self._exact is not None else self.uniform_counts()) + self.num_prefix_tokens

    def uniform_counts(self) -> np.ndarray:
        """Uniform-grid patch tokens of every sample (an upper bound of its APT tokens)."""
        if self._bound is None:
            self._bound = uniform_token_counts(self.source, self.transform, self.cfg.patch_size)
        return self._bound

    def plan(self, epoch: int) -> list[np.ndarray]:
        """All ranks' bins for ``epoch`` (sample indices) as planned packing makes them, identical on every rank."""
        if epoch not in self._plans:
            self._plans = {epoch: plan_epoch(self.token_counts(), self.source.keys, self.seed, epoch, self.shuffle,
                                             self.max_tokens, self.max_images, self.open_bins, self.world_size)}
        return self._plans[epoch]

    def bytes_per_image(self) -> Optional[np.ndarray]:
        """Bytes of each sample in a batch buffer at its uniform-grid bound (None: sizes unknown)."""
        try:
            uniform = self.uniform_counts()
        except ValueError:
            return None
        p = self.cfg.patch_size
        # every pixel once (3 bytes), <= one token per base cell (20 bytes of coordinates and
        # positions), per-image offsets and labels
        return uniform * (3 * p * p + 20) + 16

    def steps_per_epoch(self) -> int:
        """Batches per rank in a full epoch (streamed training: fixed; otherwise this epoch's)."""
        return self.strategy.steps_per_epoch()

    def mean_images_per_batch(self) -> float:
        """Mean images per batch of this rank (planned: exact; streamed: the probed estimate)."""
        return self.strategy.mean_images_per_batch()

    def describe(self) -> str:
        """How batches are filled, for messages."""
        return self.strategy.describe()

    def __len__(self) -> int:
        """Batches this rank yields in the rest of the current epoch (an estimate for streamed evaluation)."""
        return self.strategy.remaining()

    def carried_over(self) -> int:
        """Sample visits this rank's stream holds for later epochs (0 with planned packing)."""
        return self.strategy.carried_over()

    # ---------------------------------------------------------------- epochs and state
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` (a streamed epoch follows on from the one before it)."""
        epoch = int(epoch)
        changed, self.epoch = epoch != self.epoch, epoch
        self.strategy.set_epoch(epoch, changed)
        if self._live is not None and self._live.epoch != epoch - 1:
            self._drop_live()

    def resume_from(self, epoch: int, step_in_epoch: int, state: Optional[dict] = None) -> None:
        """Continue ``epoch`` after ``step_in_epoch`` batches: from ``state`` (`state_dict`) when given, else
        where the strategy can (planned packing; a ValueError says why not)."""
        if state is not None:
            self.load_state_dict(state)
            return
        self.set_epoch(epoch)
        self.strategy.resume_from(int(epoch), int(step_in_epoch), None)

    def resume(self, epoch: int, step: int) -> None:
        """`resume_from` without a state: continue ``epoch`` at batch ``step``."""
        self.resume_from(epoch, step, None)

    def state_dict(self) -> dict:
        """Where this rank's loader stands, for `load_state_dict` (plain types: JSON- and torch.save-able)."""
        d = {"version": STATE_VERSION, "packing": self.packing, "epoch": self.epoch, "seed": self.seed,
             "world_size": self.world_size, "rank": self.rank, "num_workers": self.num_workers,
             "num_samples": len(self.source)}
        d.update(self.strategy.state())
        return d

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the loader that wrote ``state`` stood (ValueError naming what differs)."""
        for k, mine in (("packing", self.packing), ("seed", self.seed), ("world_size", self.world_size),
                        ("rank", self.rank), ("num_workers", self.num_workers), ("num_samples", len(self.source))):
            if state.get(k) != mine:
                raise ValueError(f"loader state is for {k}={state.get(k)!r}, this loader has {k}={mine!r}")
        self._drop_live()
        self.epoch = int(state["epoch"])
        self.strategy.resume_from(self.epoch, int(state.get("step", 0)), state)

    def close(self) -> None:
        """Stop the workers kept for the next epoch (iterating again starts new ones)."""
        self._drop_live()

    def _drop_live(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    # ---------------------------------------------------------------- iterate
    def __iter__(self) -> Iterator[tuple]:
        strategy = self.strategy
        strategy.begin()
        live, self._live = self._live, None
        if live is not None and not strategy.reusable(live):
            live.stop()
            live = None
        if live is None:
            pool = self._take_pool(strategy.batch_bytes()) if self.num_workers > 0 else None
            if self.num_workers > 0:  # what forked workers inherit instead of each building it
                warmup()
                self.transform.prepare()
            data = strategy.dataset(pool)
            kw = (dict(prefetch_factor=self.prefetch_factor, persistent_workers=strategy.persistent_workers)
                  if self.num_workers else {})
            dl = DataLoader(data, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory, **kw)
            live = LiveWorkers(dl, data, self.epoch, iter(dl), pool)
        else:
            live.iterator = iter(live.dataloader)
        try:
            for item in _clean_errors(live.iterator):
                batch, last = strategy.receive(item)
                if last:  # its workers (and what they hold) serve the next epoch, asked for or not
                    self._live = LiveWorkers(live.dataloader, live.dataset, self.epoch, live.iterator, live.pool)
                if self._account(batch).num_images:  # not a bin of bad samples only
                    yield batch, self._targets(batch)
            strategy.finish()
        finally:
            if self._live is None or self._live.iterator is not live.iterator:  # not kept: stop its workers
                live.stop()

    def _account(self, batch):
        """Count a batch's skipped samples: once each in ``stats``, and against the rank's limit for the epoch."""
        for key, reason in zip(batch.skipped, batch.skip_reasons):
            if key not in self._bad:  # a bad file counts once, however often it is met
                self._bad.add(key)
                self.stats.skipped[reason] += 1
                self.stats.skipped_keys.append(key)
        if batch.skipped:
            n = self._epoch_skips[self.epoch] = self._epoch_skips.get(self.epoch, 0) + len(batch.skipped)
            limit = SkipLimit(self.max_skip_fraction, -(-len(self.source) // self.world_size), self.epoch,
                              f"rank {self.rank}")
            limit.check(n, f"reasons so far: {dict(self.stats.skipped)}; last: {batch.skipped[-1]}")
        return batch

    def _take_pool(self, batch_bytes: Optional[int]) -> Optional[SlotPool]:
        """The slot pool for an iteration with forked workers (the last one when idle and large enough)."""
        pool = take_pool(self._pool, self.num_workers, self.prefetch_factor,
                         batch_bytes and int(batch_bytes) + 16 + 64 * (3 * self.cfg.num_scales + 3))
        if pool is not None and (self._pool is None or not self._pool.busy):
            self._pool = pool
        if pool is not None:
            pool.busy = True
        return pool

    def _targets(self, batch):
        """What the loader yields beside a batch: its labels, or with ``mix`` timm's soft targets."""
        if self.mix is None or batch.labels is None:
            return batch.labels
        return batch.soft_targets(self.mix.num_classes, self.mix.label_smoothing)


def _rank_and_world(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world_size = 0, 1
    if not 0 <= rank < world_size:
        raise SettingError(f"rank {rank} outside world_size {world_size}", "rank")
    return int(rank), int(world_size)


def _clean_errors(it: Iterator) -> Iterator:
    """``it``'s items; a library error from a worker comes out as itself, not wrapped in its traceback."""
    try:
        yield from it
    except (TooManySkipped, SettingError) as e:
        text = str(e)
        marker = f"{type(e).__name__}: "
        if "Original Traceback" in text and marker in text:
            raise type(e)(text.rsplit(marker, 1)[1].strip()) from None
        raise
