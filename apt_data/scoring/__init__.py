"""Multi-scale patch scorers: how much detail each patch of each scale holds.

Every scorer is a Numba kernel (``@njit(cache=True, nogil=True)``, no Python loop over patches)
with a plain NumPy reference beside it that only the tests use.
"""
from __future__ import annotations

import numpy as np

from ..config import SCORER_NAMES
from ..image import check_image
from ._gray import as_rows
from .entropy import clog_table, entropy_maps_reference, entropy_pyramid
from .laplacian import laplacian_maps_reference, laplacian_pyramid
from .upsample import upsample_maps_reference, upsample_pyramid

REFERENCE_SCORERS = {
    "entropy": entropy_maps_reference,
    "laplacian": laplacian_maps_reference,
    "upsample": upsample_maps_reference,
}


def map_shapes(height: int, width: int, patch_size: int, num_scales: int) -> list[tuple[int, int]]:
    """Grid shape of each scale: ``(H // (p * 2**s), W // (p * 2**s))``."""
    return [(height // (patch_size * 2**s), width // (patch_size * 2**s)) for s in range(num_scales)]


def score_flat(image: np.ndarray, patch_size: int, num_scales: int, scorer: str = "entropy",
               need_base: bool = True) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Score every scale into one flat float32 buffer: ``(flat, offsets, shapes)``.

    ``image`` must already have passed `check_image`. ``need_base=False`` lets a scorer skip the
    scale-0 scores (selection never reads them); those entries are then undefined.
    """
    shapes = map_shapes(image.shape[0], image.shape[1], patch_size, num_scales)
    sizes = np.array([h * w for h, w in shapes], dtype=np.int64)
    offsets = np.zeros(num_scales + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    flat = np.empty(int(offsets[-1]), dtype=np.float32)
    if shapes[0][0] == 0 or shapes[0][1] == 0:
        return flat, offsets, shapes
    if not need_base and num_scales == 1:
        return flat, offsets, shapes  # nothing to decide
    rows, channels = as_rows(image)
    if scorer == "entropy":
        max_count = (patch_size * 2 ** (num_scales - 1)) ** 2
        entropy_pyramid(rows, channels, patch_size, num_scales, 0 if need_base else 1,
                        clog_table(max_count), flat, offsets)
    elif scorer == "laplacian":
        laplacian_pyramid(rows, channels, patch_size, num_scales, flat, offsets)
    elif scorer == "upsample":
        upsample_pyramid(rows, channels, patch_size, num_scales, flat, offsets)
    else:
        raise ValueError(f"unknown scorer {scorer!r}; choose one of {SCORER_NAMES}")
    return flat, offsets, shapes


def score_maps(image: np.ndarray, patch_size: int, num_scales: int, scorer: str = "entropy") -> list[np.ndarray]:
    """Score map of each scale: ``maps[s]`` is float32 of shape ``(H // (p*2**s), W // (p*2**s))``.

    ``image`` is uint8 HxWx3 or HxW (see `check_image`). Pixels beyond the last whole patch of a
    scale are ignored by that scale.
    """
    if scorer not in SCORER_NAMES:
        raise ValueError(f"unknown scorer {scorer!r}; choose one of {SCORER_NAMES}")
    if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) or patch_size <= 0:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if isinstance(num_scales, bool) or not isinstance(num_scales, (int, np.integer)) or num_scales < 1:
        raise ValueError(f"num_scales must be an int >= 1, got {num_scales!r}")
    image = check_image(image)
    flat, offsets, shapes = score_flat(image, int(patch_size), int(num_scales), scorer)
    return [flat[offsets[s]:offsets[s + 1]].reshape(shapes[s]) for s in range(num_scales)]


__all__ = ["score_maps", "score_flat", "map_shapes", "REFERENCE_SCORERS"]
