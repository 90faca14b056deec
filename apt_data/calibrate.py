"""Threshold calibration: the thresholds that keep a target fraction of the uniform grid's tokens.

Score maps are computed once per image (or read from the index), then only the selection reruns
for thresholds ``alpha * base``, ``alpha`` by bisection: raising a threshold never adds tokens,
so the kept fraction is monotone (a step function: the closest reachable fraction is reported).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np

from .config import APTConfig
from .layout import layout_from_flat_scores
from .scoring import score_maps
from .transforms import ImageTransform


@dataclass
class ScoredImage:
    flat: np.ndarray            # every scale's score map, flattened, finest first
    size: tuple[int, int]       # (H, W)


@dataclass
class Calibration:
    thresholds: tuple[float, ...]
    scale: float
    fraction: float
    target: float
    images: int
    from_index: bool


def scored_sample(source, cfg: APTConfig, transform: ImageTransform, limit: Optional[int] = None,
                  seed: int = 0) -> tuple[list[ScoredImage], bool]:
    """Score maps of up to ``limit`` random images of ``source`` (a loader `Source`); returns them and
    whether they came from the index (no decoding) rather than from scoring the decoded images."""
    n = len(source)
    ids = np.arange(n) if limit is None or limit >= n else np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))
    stored_cfg = getattr(getattr(source, "index", None), "config", None)
    use_index = (stored_cfg is not None
                 and (stored_cfg.patch_size, stored_cfg.num_scales, stored_cfg.scorer) == (cfg.patch_size, cfg.num_scales, cfg.scorer)
                 and source.exact_token_counts(stored_cfg, transform) is not None)
    out = []
    for i in ids.tolist():
        data, rec = source.read_record(i)
        if use_index and rec is not None and rec.scores is not None:
            # the index matched this transform: the stored image is the transform's output
            out.append(ScoredImage(rec.scores, (int(rec.meta["height"]), int(rec.meta["width"]))))
        else:
            img = transform(data, name=source.keys[i])
            maps = score_maps(img, cfg.patch_size, cfg.num_scales, cfg.scorer)
            out.append(ScoredImage(np.concatenate([m.ravel() for m in maps]), img.shape[:2]))
    return out, use_index


def token_fraction(images: Sequence[ScoredImage], cfg: APTConfig) -> float:
    """Patch tokens APT keeps with ``cfg`` over the uniform grid's, summed over ``images``."""
    kept = sum(len(layout_from_flat_scores(s.flat, s.size, cfg)) for s in images)
    p = cfg.patch_size
    uniform = sum((h // p) * (w // p) for h, w in (s.size for s in images))
    return kept / uniform


def calibrate(images: Sequence[ScoredImage], cfg: APTConfig, target: float, base: Optional[Sequence[float]] = None,
              iters: int = 40, tol: float = 1e-3, from_index: bool = False) -> Calibration:
    """Bisection on ``alpha`` so that thresholds ``alpha * base`` (default ``cfg.thresholds``, positive)
    keep ``target`` of the uniform tokens; ValueError when ``target`` is out of reach."""
    base = np.asarray(cfg.thresholds if base is None else base, np.float64)
    if base.shape != (cfg.num_scales - 1,) or not np.all(np.isfinite(base)) or not np.all(base > 0):
        raise ValueError(f"base thresholds must be {cfg.num_scales - 1} positive finite numbers, got {base.tolist()}")
    if not 0 < target <= 1:
        raise ValueError(f"target fraction must be in (0, 1], got {target}")

    def frac(alpha: float) -> float:
        return token_fraction(images, replace(cfg, thresholds=tuple(alpha * base)))

    lo, f_lo = 0.0, frac(0.0)  # thresholds 0: scores are >= 0, nothing merges (fraction 1)
    hi, f_hi = 1.0, frac(1.0)
    while f_hi > target and hi < 1e6:
        lo, f_lo = hi, f_hi
        hi *= 2
        f_hi = frac(hi)
    if f_hi > target:
        raise ValueError(f"target fraction {target} is out of reach: {f_hi:.4f} is the least these images keep")
    best = min(((abs(f_lo - target), lo, f_lo), (abs(f_hi - target), hi, f_hi)))
    for _ in range(iters):
        if best[0] <= tol:
            break
        mid = 0.5 * (lo + hi)
        f_mid = frac(mid)
        best = min(best, (abs(f_mid - target), mid, f_mid))
        if f_mid > target:
            lo = mid
        else:
            hi = mid
    _, alpha, fraction = best
    return Calibration(thresholds=tuple(float(alpha * b) for b in base), scale=float(alpha), fraction=float(fraction),
                       target=float(target), images=len(images), from_index=from_index)
