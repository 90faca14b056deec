"""One sample, one batch: the per-sample pipeline a loader worker runs, and the packing of its output.

`SamplePipeline.load` reads, transforms (seeded per sample) and lays out sample ``i``;
`SamplePipeline.ship` packs loaded samples into one batch buffer. Every loader mode and baseline
goes through these two, so a sample is treated the same way everywhere.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .config import APTConfig, TokenBudget
from .layout import PatchLayout, layout_from_flat_scores, patchify
from .mixing import MixConfig, apply_mix, draw_mix
from .assemble import prepare_batch
from .sources import Source
from .transforms import ImageTransform
from .transport import SlotPool, ship_batch

log = logging.getLogger("apt_data.loader")

#: ``layout_fn(image, cfg, index) -> PatchLayout``: the layout of a transformed image (uint8 HxWx3),
#: given the loader's config and the sample's index in the source; replaces `patchify`.
LayoutFn = Callable[[np.ndarray, APTConfig, int], PatchLayout]

#: A mixed sample's ``(partner label, lam)``: its target is ``lam`` of its own label, ``1 - lam`` of the
#: partner's (`apt_data.mixing`); None for a sample that was not mixed.
MixTarget = Optional[tuple[int, float]]

__all__ = ["LayoutFn", "LoaderStats", "SamplePipeline", "SkipLimit", "SkipLog", "SkippedOnly", "TooManySkipped",
           "probe_mean", "sample_seed", "skip_reason"]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of one sample's random augmentation: independent of worker and rank."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class TooManySkipped(ValueError):
    """More samples of an epoch were bad than the loader's ``max_skip_fraction`` allows, or a worker's
    whole share was unreadable."""


@dataclass
class SkipLimit:
    """When the bad samples of one share of an epoch (a rank's, or one worker's) stop it: more than
    ``max_fraction`` of its ``share`` samples and more than 10, or every one of them."""

    max_fraction: float
    share: int
    epoch: int
    where: str

    def check(self, count: int, detail: str) -> None:
        if count >= self.share > 0:
            why = f"none of its {self.share} samples is readable"
        elif count > max(10.0, self.max_fraction * self.share):
            why = f"more than {self.max_fraction:.1%} of its {self.share} samples"
        else:
            return
        raise TooManySkipped(f"{count} bad samples skipped in epoch {self.epoch} of {self.where}: {why} ({detail}); "
                             "fix the data, or raise max_skip_fraction")


class SkipLog:
    """One worker's bad samples: each logged and handed over once (`take`), never decoded again, and
    counted against ``limit`` for the epoch as met (`begin_epoch` starts the count)."""

    def __init__(self, limit: Optional[SkipLimit] = None):
        self.limit, self.pending, self.count, self.first = limit, [], 0, []
        self.bad: set[int] = set()  # sample indices known to be bad

    def begin_epoch(self, limit: Optional[SkipLimit]) -> None:
        self.limit, self.count, self.first = limit, 0, []

    def known(self, i: int) -> bool:
        """Sample ``i`` proved bad before: counted for this epoch again, not decoded, logged or reported."""
        if i in self.bad:
            self._count()
            return True
        return False

    def add(self, i: int, key: str, error: Exception) -> None:
        text = str(error) if key in str(error) else f"{key}: {error}"
        log.warning("skipping sample %s", text)
        self.pending.append((key, skip_reason(error)))
        self.bad.add(i)
        if len(self.first) < 3:
            self.first.append(text)
        self._count()

    def _count(self) -> None:
        self.count += 1
        if self.limit is not None:
            self.limit.check(self.count, "first errors: " + "; ".join(self.first))

    def take(self) -> list:
        out, self.pending = self.pending, []
        return out


class ScoresMismatch(ValueError):
    """A sample's stored score maps are unusable (not finite, or not the index's token count)."""

    reason = "bad score maps"


class SkippedOnly:
    """What a planned bin whose samples were all bad yields instead of an empty batch: its skips."""

    def __init__(self, skipped: list):
        self.num_images = 0
        self.skipped = tuple(k for k, _ in skipped)
        self.skip_reasons = tuple(r for _, r in skipped)


def skip_reason(e: Exception) -> str:
    """A short reason under which a skipped sample is counted: the error's own structured ``reason``
    (the shard reader's `ShardDataError` has one), else the kind of decoding failure."""
    if isinstance(getattr(e, "reason", None), str):
        return e.reason
    msg = str(e)
    for tag in ("0 bytes", "not an image", "truncated", "cannot decode"):
        if tag in msg:
            return tag
    return type(e).__name__


@dataclass
class LoaderStats:
    """What the loader skipped, with reasons (bad files are logged, counted and skipped)."""

    skipped: Counter = field(default_factory=Counter)
    skipped_keys: list = field(default_factory=list)
    carried_over: dict = field(default_factory=dict)  # epoch -> samples of this rank left for later epochs

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


@dataclass(frozen=True)
class SamplePipeline:
    """Read, transform and lay out one sample; pack loaded samples into a batch.

    ``use_scores``: layouts come from the source's stored score maps; ``strict``: a bad sample raises;
    ``mix``: Mixup / CutMix with a partner before the layout (`apt_data.mixing`).
    """

    source: Source
    cfg: APTConfig
    transform: ImageTransform
    seed: int = 0
    layout_fn: Optional[LayoutFn] = None
    use_scores: bool = False
    budget: TokenBudget = TokenBudget(4096)
    strict: bool = False
    mix: Optional[MixConfig] = None

    def load(self, i: int, epoch: int) -> tuple[np.ndarray, PatchLayout, MixTarget]:
        """Sample ``i``: read -> transform (seeded by ``(seed, epoch, i)``) -> mix -> layout:
        ``(image, layout, mix target)``. Raises ValueError or OSError for a bad sample."""
        img, _, layout, target = self.load_with_mask(i, epoch)
        return img, layout, target

    def load_with_mask(self, i: int, epoch: int) -> tuple[np.ndarray, Optional[np.ndarray], PatchLayout, MixTarget]:
        """`load` with the sample's segmentation mask, moved and mixed with its image:
        ``(image, mask or None, layout, mix target)``."""
        key = self.source.keys[i]
        mask = None
        if self.source.has_masks:  # dense samples: the mask goes wherever the image goes
            (data, mask), scores = self.source.read_with_mask(i), None
        elif self.use_scores and self.layout_fn is None and self.mix is None:
            data, scores = self.source.read_scores(i)
        else:
            data, scores = self.source.read(i), None
        img, mask = self._transformed(data, key, epoch, i, mask)
        img, target, mask = self._mixed(img, i, epoch, mask)
        if self.layout_fn is not None:
            return img, mask, self.layout_fn(img, self.cfg, i), target
        if scores is not None:  # deterministic transform of the stored image: reuse the stored score maps
            if not np.isfinite(scores).all():
                raise ScoresMismatch(f"{key}: its stored score maps hold NaN or inf (a corrupt .npy member)")
            return img, mask, layout_from_flat_scores(scores, img.shape[:2], self.cfg), target
        return img, mask, patchify(img, self.cfg), target

    def _transformed(self, data, key: str, epoch: int, i: int, mask=None) -> tuple[np.ndarray, Optional[np.ndarray]]:
        out = self.transform(data, name=key, seed=sample_seed(self.seed, epoch, i) if self.transform.augment else 0,
                             mask=mask)
        return (out, None) if mask is None else out

    def _mixed(self, img: np.ndarray, i: int, epoch: int,
               mask: Optional[np.ndarray] = None) -> tuple[np.ndarray, MixTarget, Optional[np.ndarray]]:
        """Sample ``i`` (and mask) mixed with its partner of pass ``epoch``; an unreadable partner leaves it
        unmixed, with a warning."""
        if mask is not None and self.mix is not None:
            self.mix.check_masks()
        draw = None if self.mix is None else draw_mix(self.mix, self.seed, epoch, i, len(self.source))
        if draw is None:
            return img, None, mask
        j = draw.partner
        try:
            other = self.source.read_with_mask(j) if mask is not None else (self.source.read(j), None)
            other, other_mask = self._transformed(other[0], self.source.keys[j], epoch, j, other[1])
        except (ValueError, OSError) as e:
            log.warning("sample %s: its mix partner %s is unreadable (%s); not mixed", self.source.keys[i],
                        self.source.keys[j], e)
            return img, None, mask
        if mask is None:
            mixed, lam = apply_mix(img, other, draw, self.mix.correct_lam)
        else:
            mixed, lam, mask = apply_mix(img, other, draw, self.mix.correct_lam, mask, other_mask)
        return mixed, (int(self.source.labels[j]), lam), mask

    def try_load(self, i: int, epoch: int, skips: SkipLog, exact: Optional[np.ndarray] = None) -> Optional[tuple]:
        """`load_with_mask`, with a bad sample added to ``skips`` (strict: raised). ``exact``: the index's
        token counts, which the layout must match."""
        if skips.known(i):
            return None
        try:
            loaded = self.load_with_mask(i, epoch)
            if exact is not None and len(loaded[-2]) != exact[i]:
                raise ScoresMismatch(f"{self.source.keys[i]}: its stored score maps give {len(loaded[-2])} tokens, "
                                     f"the index {exact[i]} (a corrupt .npy member, or an index made with another "
                                     "config)")
            return loaded
        except (ValueError, OSError) as e:
            key = self.source.keys[i]
            if self.strict:
                raise ValueError(str(e) if key in str(e) else f"sample {key}: {e}") from e
            skips.add(i, key, e)
            return None

    def build(self, sample_ids: np.ndarray, epoch: int, skips: SkipLog, exact: Optional[np.ndarray] = None,
              pool: Optional[SlotPool] = None):
        """Load and pack one planned bin (``exact``: the index's counts, checked)."""
        ids, loaded = [], []
        for i in sample_ids.tolist():
            sample = self.try_load(i, epoch, skips, exact)
            if sample is not None:
                ids.append(i)
                loaded.append(sample)
        if not loaded:  # never an empty batch: the skips alone travel to the main process
            return SkippedOnly(skips.take())
        images, masks, layouts, mixes = (list(v) for v in zip(*loaded))  # masks: None without them
        return self.ship(images, layouts, [int(self.source.labels[i]) for i in ids], [self.source.keys[i] for i in ids],
                         skips.take(), pool, mixes, masks if self.source.has_masks else None)

    def ship(self, images: list, layouts: list, labels: list, keys: list, skipped: list,
             pool: Optional[SlotPool] = None, mixes: Optional[list] = None, masks: Optional[list] = None):
        """Pack loaded samples into a `PackedBatch` (in a worker: a `WireBatch`), with each sample's
        `MixTarget` (``mixes``) and segmentation mask (``masks``) when given."""
        b = self.budget
        real = sum(len(lay) for lay in layouts) + b.num_prefix_tokens * len(layouts)
        if real > b.max_tokens:
            raise RuntimeError(f"batch of {keys} holds {real} tokens > max_tokens={b.max_tokens} (packing bug)")
        pad = b.max_tokens - real if b.static_shapes else 0
        mix = None
        if self.mix is not None and mixes is not None:
            mix = ([lab if m is None else m[0] for lab, m in zip(labels, mixes)],
                   [1.0 if m is None else m[1] for m in mixes])
        spec, images, layouts, labels = prepare_batch(images, self.cfg, labels, b.num_prefix_tokens, layouts, pad,
                                                      keys=keys, skipped=[k for k, _ in skipped],
                                                      skip_reasons=[r for _, r in skipped], mix=mix)
        batch = ship_batch(spec, images, layouts, labels, pool)
        if masks is None:
            return batch
        return batch.with_masks(masks, same_size=not self.transform.keep_mask_size)  # packed beside the tokens

    def tokens(self, i: int, epoch: int = 0) -> Optional[int]:
        """Tokens of sample ``i`` (prefix included) through the pipeline, checked against the budget;
        None for an unreadable sample."""
        try:
            n = len(self.load(i, epoch)[1]) + self.budget.num_prefix_tokens
        except (ValueError, OSError):
            return None
        return self.budget.check(n, self.source.keys[i])

    def mean_tokens(self, ids: np.ndarray) -> float:
        """Mean tokens per sample (prefix included) of samples ``ids`` (pass 0): the probe that sizes
        streamed epochs. Unreadable samples are left out; one over the budget is an error."""
        return probe_mean([self.tokens(i) for i in ids.tolist()], [self.source.keys[i] for i in ids[:1]])


def probe_mean(counts: list, first_keys: list) -> float:
    """The mean of the probed token counts that are not None (unreadable samples)."""
    good = [c for c in counts if c is not None and c > 0]
    if not good:
        raise ValueError(f"none of the {len(counts)} probed samples could be read: {', '.join(first_keys)}, ...")
    return float(np.mean(good))
