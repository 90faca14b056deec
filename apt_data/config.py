"""`APTConfig`: how an image is cut into patches of several sizes; `TokenBudget`: what one batch may hold.

Both validate their values once, in their constructors; an invalid value raises a `SettingError`
(a ValueError) whose ``setting`` names the parameter, so a command line can name its own flag.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import math
from typing import Optional

import numpy as np

from .scoring.registry import SCORER_NAMES, as_numbers, get_scorer, scorer_names

__all__ = ["APTConfig", "OverBudget", "SCORER_NAMES", "SettingError", "TokenBudget", "scorer_names"]


class SettingError(ValueError):
    """A library setting with an invalid value; ``setting`` is the parameter's name (e.g. ``"max_tokens"``)."""

    setting = ""

    def __init__(self, message: str, setting: Optional[str] = None):
        super().__init__(message)
        if setting is not None:
            self.setting = setting


class OverBudget(SettingError):
    """A sample needs more tokens than a whole batch may hold."""

    setting = "max_tokens"


def _require(ok: bool, setting: str, message: str) -> None:
    if not ok:
        raise SettingError(message, setting)


@dataclass(frozen=True)
class APTConfig:
    """Multi-scale patch configuration.

    Scale ``s`` covers ``patch_size * 2**s`` px; a scale-``s >= 1`` patch is kept where its score is
    strictly below ``thresholds[s-1]`` (scorer units; ``-inf`` disables, ``+inf`` always keeps),
    coarsest first. ``thresholds=None`` takes the scorer's registered defaults (entropy, 3 scales:
    5.5 and 4.0 bits, the paper's), else ValueError. ``scorer``: any of `scorer_names()`.
    """

    patch_size: int = 16
    num_scales: int = 3
    thresholds: Optional[tuple[float, ...]] = None
    scorer: str = "entropy"
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        p, n = self.patch_size, self.num_scales
        _require(_is_int(p) and p > 0, "patch_size", f"APTConfig.patch_size must be a positive int, got {p!r}")
        _require(p <= 255, "patch_size", f"APTConfig.patch_size must be <= 255, got {p}")
        _require(_is_int(n) and n >= 1, "num_scales", f"APTConfig.num_scales must be an int >= 1, got {n!r}")
        _require(n <= 6, "num_scales", f"APTConfig.num_scales must be <= 6 (patches up to 64x the base), got {n}")
        _require(isinstance(self.scorer, str) and self.scorer in SCORER_NAMES, "scorer",
                 f"APTConfig.scorer must be one of {scorer_names()}, got {self.scorer!r}")
        if self.thresholds is None:
            try:
                thresholds = get_scorer(self.scorer).thresholds_for(n)
            except ValueError as e:
                raise SettingError(f"APTConfig.thresholds: {e}", "thresholds") from None
        else:
            thresholds = as_numbers(self.thresholds)
            _require(thresholds is not None, "thresholds",
                     f"APTConfig.thresholds must be a sequence of numbers, got {self.thresholds!r}")
        _require(len(thresholds) == n - 1, "thresholds",
                 f"APTConfig.thresholds needs one value per scale above the base (num_scales - 1 = {n - 1}), "
                 f"got {len(thresholds)}: {self.thresholds!r}")
        _require(not any(math.isnan(t) for t in thresholds), "thresholds",
                 f"APTConfig.thresholds must not contain NaN: {self.thresholds!r}")
        object.__setattr__(self, "thresholds", thresholds)

    @property
    def max_patch_size(self) -> int:
        """Side in pixels of the coarsest patch."""
        return self.patch_size * 2 ** (self.num_scales - 1)

    def patch_sizes(self) -> tuple[int, ...]:
        """Side in pixels of the patch at each scale, finest first."""
        return tuple(self.patch_size * 2**s for s in range(self.num_scales))


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@dataclass(frozen=True)
class TokenBudget:
    """What one batch may hold: ``max_tokens`` (prefix included), ``max_images`` (None: no cap),
    ``num_prefix_tokens`` per image; ``static_shapes`` pads every batch to ``max_tokens``."""

    max_tokens: int
    max_images: Optional[int] = None
    num_prefix_tokens: int = 1
    static_shapes: bool = False

    def __post_init__(self) -> None:
        _require(_is_int(self.max_tokens) and self.max_tokens > 0, "max_tokens",
                 f"max_tokens must be a positive int, got {self.max_tokens!r}")
        _require(self.max_images is None or (_is_int(self.max_images) and self.max_images > 0), "max_images",
                 f"max_images must be a positive int or None, got {self.max_images!r}")
        _require(_is_int(self.num_prefix_tokens) and self.num_prefix_tokens >= 0, "num_prefix_tokens",
                 f"num_prefix_tokens must be an int >= 0, got {self.num_prefix_tokens!r}")
        for k in ("max_tokens", "max_images", "num_prefix_tokens"):
            if getattr(self, k) is not None:
                object.__setattr__(self, k, int(getattr(self, k)))
        object.__setattr__(self, "static_shapes", bool(self.static_shapes))

    def check(self, tokens: int, sample: object) -> int:
        """``tokens`` (prefix included) of ``sample``, or `OverBudget` naming it when a batch cannot hold it."""
        if tokens > self.max_tokens:
            raise OverBudget(f"sample {sample} needs {tokens} tokens, more than the batch budget "
                             f"max_tokens={self.max_tokens}; raise max_tokens or lower the image size")
        return tokens

    def check_image_fits(self, smallest_patch_tokens: int) -> None:
        """The budget must hold one image of at least ``smallest_patch_tokens`` patch tokens."""
        need = self.num_prefix_tokens + max(1, smallest_patch_tokens)
        _require(self.max_tokens >= need, "max_tokens",
                 f"max_tokens={self.max_tokens} cannot hold a single image ({self.num_prefix_tokens} prefix + "
                 f"at least {max(1, smallest_patch_tokens)} patch tokens)")
