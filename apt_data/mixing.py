"""Mixup and CutMix for token-packed batches: per sample, in the loader's workers, before patchify.

Token counts depend on the mixed pixels, so sample ``i`` of pass ``epoch`` draws from its own seed
whether it is mixed, a partner from the whole source, the mode and ``lam`` (timm's ``mode="elem"``,
deterministic for any number of workers); `soft_targets` builds timm's soft targets (docs/loader.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = ["MIXUP_MASKS", "MixConfig", "MixDraw", "apply_mix", "draw_mix", "soft_targets"]

#: Why Mixup and segmentation masks do not go together.
MIXUP_MASKS = ("Mixup does not apply to segmentation masks (a blended pixel has two classes): mix masks with "
               "CutMix only (mixup_alpha=0)")
_MIX_STREAM = 0x6D1C  # keeps the mixing draws apart from the augmentation's stream of the same sample


@dataclass(frozen=True)
class MixConfig:
    """Mixup / CutMix settings, with timm's names and meanings (`timm.data.Mixup`); ``label_smoothing``
    and ``num_classes`` are those of the soft targets."""

    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    cutmix_minmax: Optional[tuple[float, float]] = None
    prob: float = 1.0
    switch_prob: float = 0.5
    correct_lam: bool = True
    label_smoothing: float = 0.1
    num_classes: int = 1000

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError(f"mixup/cutmix alpha must be >= 0, got {self.mixup_alpha}, {self.cutmix_alpha}")
        if not (0.0 <= self.prob <= 1.0 and 0.0 <= self.switch_prob <= 1.0):
            raise ValueError(f"mix prob and switch prob must lie in [0, 1], got {self.prob}, {self.switch_prob}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label smoothing must lie in [0, 1), got {self.label_smoothing}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.cutmix_minmax is not None:
            lo, hi = self.cutmix_minmax
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"cutmix_minmax must be 0 < min <= max <= 1, got {self.cutmix_minmax}")

    @property
    def active(self) -> bool:
        """True when some samples get mixed."""
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0 or self.cutmix_minmax is not None)

    def check_masks(self) -> None:
        """Raise a ``RuntimeError`` (a setting, not bad data) when these settings would Mixup masks."""
        if self.active and self.mixup_alpha > 0:
            raise RuntimeError(MIXUP_MASKS)


@dataclass(frozen=True)
class MixDraw:
    """What one sample draws: its partner, the mode, ``lam`` (before a CutMix correction) and the
    CutMix box centre as fractions of the image's height and width."""

    partner: int
    cutmix: bool
    lam: float
    centre: tuple[float, float] = (0.5, 0.5)
    side: Optional[float] = None  # CutMix box side ratio (cutmix_minmax), else sqrt(1 - lam)


def draw_mix(mix: MixConfig, seed: int, epoch: int, index: int, num_samples: int) -> Optional[MixDraw]:
    """Sample ``index``'s mixing in pass ``epoch``, from its own seed (None: not mixed)."""
    if not mix.active or num_samples < 2:
        return None
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, index, _MIX_STREAM]))
    if rng.random() >= mix.prob:
        return None
    partner = int(rng.integers(num_samples - 1))
    partner += partner >= index  # never itself
    can_cut = mix.cutmix_alpha > 0 or mix.cutmix_minmax is not None
    cutmix = can_cut and (mix.mixup_alpha <= 0 or rng.random() < mix.switch_prob)
    centre = (float(rng.random()), float(rng.random()))
    if cutmix and mix.cutmix_minmax is not None:
        side = float(rng.uniform(*mix.cutmix_minmax))
        return MixDraw(partner, True, 1.0 - side * side, centre, side)
    alpha = mix.cutmix_alpha if cutmix else mix.mixup_alpha
    return MixDraw(partner, cutmix, float(rng.beta(alpha, alpha)), centre)


def cutmix_box(height: int, width: int, draw: MixDraw) -> tuple[int, int, int, int]:
    """The CutMix box ``(y0, y1, x0, x1)`` of a ``height x width`` image, clipped to it (timm's
    ``rand_bbox``: sides ``ratio * (height, width)`` about a uniformly drawn centre)."""
    ratio = draw.side if draw.side is not None else float(np.sqrt(1.0 - draw.lam))
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(draw.centre[0] * height), int(draw.centre[1] * width)
    y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
    x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
    return int(y0), int(y1), int(x0), int(x1)


def apply_mix(image: np.ndarray, partner: np.ndarray, draw: MixDraw, correct_lam: bool = True,
              mask: Optional[np.ndarray] = None, partner_mask: Optional[np.ndarray] = None):
    """Mix uint8 HxWx3 ``image`` with ``partner`` (resized to it): ``(mixed image, lam)``, or with masks
    ``(..., mixed mask)`` (CutMix only: Mixup on masks is a ``RuntimeError``)."""
    H, W = image.shape[:2]
    if mask is not None and not draw.cutmix:
        raise RuntimeError(MIXUP_MASKS)
    if partner.shape[:2] != (H, W):
        from PIL import Image

        partner = np.asarray(Image.fromarray(partner).resize((W, H), Image.BICUBIC))
        if partner_mask is not None:
            partner_mask = np.asarray(Image.fromarray(partner_mask).resize((W, H), Image.NEAREST))
    if draw.cutmix:
        y0, y1, x0, x1 = cutmix_box(H, W, draw)
        out = np.array(image, copy=True)
        out[y0:y1, x0:x1] = partner[y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(H * W) if correct_lam or draw.side is not None else draw.lam
        if mask is None:
            return out, float(lam)
        mixed = np.array(mask, copy=True)
        mixed[y0:y1, x0:x1] = partner_mask[y0:y1, x0:x1]
        return out, float(lam), mixed
    lam = draw.lam
    blend = image.astype(np.float32) * lam + partner.astype(np.float32) * (1.0 - lam)
    return np.clip(blend + 0.5, 0, 255).astype(np.uint8), float(lam)


def soft_targets(labels, num_classes: int, smoothing: float = 0.0, mix_labels=None, mix_lam=None):
    """timm's mixup targets ``[B, num_classes]``: ``lam * smooth(labels) + (1 - lam) * smooth(mix_labels)``."""
    import torch

    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    y = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    if mix_labels is None:
        return y.scatter_(1, labels.long()[:, None], on)
    lam = mix_lam.to(torch.float32)[:, None]
    y1 = y.scatter(1, labels.long()[:, None], on)
    y2 = y.scatter(1, mix_labels.long()[:, None], on)
    return y1 * lam + y2 * (1.0 - lam)
