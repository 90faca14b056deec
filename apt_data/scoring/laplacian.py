"""The ``laplacian`` scorer: mean absolute discrete Laplacian of the grayscale image per patch (paper appendix).

Computed on the whole image (edges replicated), so a score does not depend on the grid; coarser
means are the means of their four children.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ._gray import gray_plane, gray_plane_reference, patch_means, rows_pyramid
from .registry import register_scorer

#: Defaults for 3 scales, chosen to keep about the token fraction of entropy's (5.5, 4.0): on the
#: photos in tests/data/images (decode_image at 224 and 384 px, pooled), each threshold is the
#: quantile of this scorer's scale-s scores at the fraction of scale-s patches that entropy scores
#: below its threshold (here 4.36, 1.18), rounded to two significant digits.
DEFAULT_THRESHOLDS = {3: (4.4, 1.2)}


@njit(cache=True, nogil=True)
def laplacian_pyramid(rows, channels, p, num_scales, flat, offsets):
    """Every scale's map into ``flat`` (scale s at ``offsets[s]``); ``rows``: the ``(H, W*C)`` uint8 view."""
    g = gray_plane(rows, channels)
    H, W = g.shape
    h0 = H // p
    w0 = W // p
    base = np.zeros((h0, w0), np.float64)
    lap = np.empty(w0 * p, np.float64)
    for y in range(h0 * p):
        up = g[y - 1 if y > 0 else 0]
        mid = g[y]
        down = g[y + 1 if y + 1 < H else H - 1]
        for x in range(w0 * p):
            xm = x - 1 if x > 0 else 0
            xp = x + 1 if x + 1 < W else W - 1
            lap[x] = abs(4.0 * mid[x] - up[x] - down[x] - mid[xm] - mid[xp])
        i = y // p
        for j in range(w0):
            acc = 0.0
            for x in range(j * p, (j + 1) * p):
                acc += lap[x]
            base[i, j] += acc
    cur = base / (p * p)
    _coarsen_means(cur, num_scales, flat, offsets)


@njit(cache=True, nogil=True)
def _coarsen_means(cur, num_scales, flat, offsets):
    """Write ``cur`` (scale-0 means) and the means of 2x2 children for every coarser scale."""
    for s in range(num_scales):
        if s > 0:
            nh = cur.shape[0] // 2
            nw = cur.shape[1] // 2
            nxt = np.empty((nh, nw), np.float64)
            for i in range(nh):
                for j in range(nw):
                    nxt[i, j] = 0.25 * (cur[2 * i, 2 * j] + cur[2 * i, 2 * j + 1] + cur[2 * i + 1, 2 * j] + cur[2 * i + 1, 2 * j + 1])
            cur = nxt
        o = offsets[s]
        k = 0
        for i in range(cur.shape[0]):
            for j in range(cur.shape[1]):
                flat[o + k] = np.float32(cur[i, j])
                k += 1


def laplacian_maps_reference(image: np.ndarray, patch_size: int, num_scales: int) -> list[np.ndarray]:
    """Plain NumPy twin (tests only): Laplacian by padded slicing, mean per patch directly."""
    g = gray_plane_reference(image).astype(np.float64)
    pad = np.pad(g, 1, mode="edge")
    lap = np.abs(4 * g - pad[:-2, 1:-1] - pad[2:, 1:-1] - pad[1:-1, :-2] - pad[1:-1, 2:])
    return patch_means(lap, patch_size, num_scales)


register_scorer("laplacian", rows_pyramid(laplacian_pyramid), laplacian_maps_reference, DEFAULT_THRESHOLDS,
                units="gray levels", description="mean absolute discrete Laplacian of the gray image", builtin=True)
