"""Multi-scale patch scorers: how much detail each patch of each scale holds.

`score_maps` / `score_flat` dispatch through the registry; each built-in scorer is one module of
Numba kernels with a NumPy reference for the tests, registered on import.
"""
from __future__ import annotations

import numpy as np

from ..image import check_image
from .registry import (REFERENCE_SCORERS, SCORER_NAMES, Scorer, get_scorer, register_scorer, scorer_names,
                       unregister_scorer)
from . import entropy, laplacian, upsample  # noqa: F401  (built-ins register themselves, in this order)


def map_shapes(height: int, width: int, patch_size: int, num_scales: int) -> list[tuple[int, int]]:
    """Grid shape of each scale: ``(H // (p * 2**s), W // (p * 2**s))``."""
    return [(height // (patch_size * 2**s), width // (patch_size * 2**s)) for s in range(num_scales)]


def score_flat(image: np.ndarray, patch_size: int, num_scales: int, scorer: str = "entropy",
               need_base: bool = True) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Score every scale of a checked ``image`` into one flat float32 buffer: ``(flat, offsets, shapes)``;
    ``need_base=False`` may leave scale 0 undefined."""
    kernel = get_scorer(scorer).pyramid
    shapes = map_shapes(image.shape[0], image.shape[1], patch_size, num_scales)
    offsets = np.cumsum([0] + [h * w for h, w in shapes], dtype=np.int64)
    flat = np.empty(int(offsets[-1]), dtype=np.float32)
    if shapes[0][0] and shapes[0][1] and (need_base or num_scales > 1):  # else nothing to score or to decide
        kernel(image, patch_size, num_scales, 0 if need_base else 1, flat, offsets)
    return flat, offsets, shapes


def score_maps(image: np.ndarray, patch_size: int, num_scales: int, scorer: str = "entropy") -> list[np.ndarray]:
    """Score map of each scale, float32 ``(H // (p*2**s), W // (p*2**s))`` (partial patches ignored)."""
    get_scorer(scorer)
    if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) or patch_size <= 0:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if isinstance(num_scales, bool) or not isinstance(num_scales, (int, np.integer)) or num_scales < 1:
        raise ValueError(f"num_scales must be an int >= 1, got {num_scales!r}")
    image = check_image(image)
    flat, offsets, shapes = score_flat(image, int(patch_size), int(num_scales), scorer)
    return [flat[offsets[s]:offsets[s + 1]].reshape(shapes[s]) for s in range(num_scales)]


__all__ = ["score_maps", "score_flat", "map_shapes", "Scorer", "register_scorer", "unregister_scorer", "get_scorer",
           "scorer_names", "SCORER_NAMES", "REFERENCE_SCORERS"]
