"""`APTConfig`: how an image is cut into patches of several sizes."""
from __future__ import annotations

from dataclasses import dataclass, field
import math
from typing import Optional

from .scoring.registry import SCORER_NAMES, get_scorer, scorer_names

__all__ = ["APTConfig", "SCORER_NAMES", "scorer_names"]


@dataclass(frozen=True)
class APTConfig:
    """Multi-scale patch configuration.

    Scale ``s`` covers ``patch_size * 2**s`` pixels per side (scale 0 is the model's own patch).
    ``thresholds[s-1]`` decides scale ``s >= 1``: a scale-``s`` patch is kept where its score is
    strictly below the threshold, in the scorer's own units. ``thresholds=None`` (the default)
    takes the scorer's registered defaults for ``num_scales`` (entropy, in bits: 2x patches below
    5.5, 4x below 4.0, as in the paper's reference code), and ``cfg.thresholds`` then holds them;
    a scorer without defaults for ``num_scales`` raises ValueError. Coarsest scale is decided first;
    finer patches are never emitted inside a kept coarser one. ``-inf`` disables a scale, ``+inf``
    always keeps it. ``scorer``: any registered name (`scorer_names()`).
    """

    patch_size: int = 16
    num_scales: int = 3
    thresholds: Optional[tuple[float, ...]] = None
    scorer: str = "entropy"
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.patch_size, bool) or not isinstance(self.patch_size, (int,)) or self.patch_size <= 0:
            raise ValueError(f"APTConfig.patch_size must be a positive int, got {self.patch_size!r}")
        if self.patch_size > 255:
            raise ValueError(f"APTConfig.patch_size must be <= 255, got {self.patch_size}")
        if isinstance(self.num_scales, bool) or not isinstance(self.num_scales, int) or self.num_scales < 1:
            raise ValueError(f"APTConfig.num_scales must be an int >= 1, got {self.num_scales!r}")
        if self.num_scales > 6:
            raise ValueError(f"APTConfig.num_scales must be <= 6 (patches up to 64x the base), got {self.num_scales}")
        if not isinstance(self.scorer, str) or self.scorer not in SCORER_NAMES:
            raise ValueError(f"APTConfig.scorer must be one of {scorer_names()}, got {self.scorer!r}")
        if self.thresholds is None:
            try:
                thresholds = get_scorer(self.scorer).thresholds_for(self.num_scales)
            except ValueError as e:
                raise ValueError(f"APTConfig.thresholds: {e}") from None
        else:
            thresholds = _as_thresholds(self.thresholds)
        if len(thresholds) != self.num_scales - 1:
            raise ValueError(
                f"APTConfig.thresholds needs one value per scale above the base (num_scales - 1 = "
                f"{self.num_scales - 1}), got {len(thresholds)}: {self.thresholds!r}")
        if any(math.isnan(t) for t in thresholds):
            raise ValueError(f"APTConfig.thresholds must not contain NaN: {self.thresholds!r}")
        object.__setattr__(self, "thresholds", thresholds)

    @property
    def max_patch_size(self) -> int:
        """Side in pixels of the coarsest patch."""
        return self.patch_size * 2 ** (self.num_scales - 1)

    def patch_sizes(self) -> tuple[int, ...]:
        """Side in pixels of the patch at each scale, finest first."""
        return tuple(self.patch_size * 2**s for s in range(self.num_scales))


def _as_thresholds(value) -> tuple[float, ...]:
    """Explicit thresholds as a tuple of floats; a clear ValueError for strings, scalars and non-numbers."""
    if isinstance(value, (str, bytes)):
        raise ValueError(f"APTConfig.thresholds must be a sequence of numbers, not a string: {value!r}")
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"APTConfig.thresholds must be a sequence of numbers, got {value!r}") from None
    out = []
    for t in items:
        if isinstance(t, (str, bytes)):
            raise ValueError(f"APTConfig.thresholds must contain numbers, got {t!r} in {value!r}")
        try:
            out.append(float(t))
        except (TypeError, ValueError):
            raise ValueError(f"APTConfig.thresholds must contain numbers, got {t!r} in {value!r}") from None
    return tuple(out)
