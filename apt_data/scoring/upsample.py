"""The ``upsample`` scorer: reconstruction error of a patch after 2^s-down-then-up-sampling (paper appendix).

The mean squared error against 2^s x 2^s block means:
``(sum g^2 - sum_blocks (block sum)^2 / 4^s) / pixels``; scale 0 is 0.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ._gray import gray_plane, gray_plane_reference, patch_means, rows_pyramid
from .registry import register_scorer

#: Defaults for 3 scales, chosen to keep about the token fraction of entropy's (5.5, 4.0): on the
#: photos in tests/data/images (decode_image at 224 and 384 px, pooled), each threshold is the
#: quantile of this scorer's scale-s scores at the fraction of scale-s patches that entropy scores
#: below its threshold (here 6.81, 0.695), rounded to two significant digits.
DEFAULT_THRESHOLDS = {3: (6.8, 0.7)}


@njit(cache=True, nogil=True)
def upsample_pyramid(rows, channels, p, num_scales, flat, offsets):
    """Every scale's map into ``flat`` (scale s at ``offsets[s]``); ``rows``: the ``(H, W*C)`` uint8 view."""
    g = gray_plane(rows, channels)
    H, W = g.shape
    h0 = H // p
    w0 = W // p
    # sum of squares per base patch, coarsened by summing children
    sq = np.zeros((h0, w0), np.float64)
    for y in range(h0 * p):
        i = y // p
        for x in range(w0 * p):
            v = np.float64(g[y, x])
            sq[i, x // p] += v * v
    level = np.empty((h0 * p, w0 * p), np.float64)  # block sums at level k (blocks of 2^k pixels)
    for y in range(h0 * p):
        for x in range(w0 * p):
            level[y, x] = g[y, x]
    for o in range(offsets[0], offsets[0] + h0 * w0):
        flat[o] = 0.0
    hs = h0
    ws = w0
    for s in range(1, num_scales):
        nh = hs // 2
        nw = ws // 2
        nsq = np.empty((nh, nw), np.float64)
        for i in range(nh):
            for j in range(nw):
                nsq[i, j] = sq[2 * i, 2 * j] + sq[2 * i, 2 * j + 1] + sq[2 * i + 1, 2 * j] + sq[2 * i + 1, 2 * j + 1]
        sq = nsq
        hs = nh
        ws = nw
        lh = level.shape[0] // 2
        lw = level.shape[1] // 2
        nxt = np.empty((lh, lw), np.float64)
        for y in range(lh):
            for x in range(lw):
                nxt[y, x] = level[2 * y, 2 * x] + level[2 * y, 2 * x + 1] + level[2 * y + 1, 2 * x] + level[2 * y + 1, 2 * x + 1]
        level = nxt
        inv_block = 1.0 / (4.0 ** s)
        npix = (p * 2**s) ** 2
        base = offsets[s]
        for i in range(hs):
            for j in range(ws):
                t = 0.0
                for r in range(i * p, (i + 1) * p):
                    for c in range(j * p, (j + 1) * p):
                        t += level[r, c] * level[r, c]
                err = (sq[i, j] - t * inv_block) / npix
                flat[base + i * ws + j] = np.float32(err if err > 0.0 else 0.0)


def upsample_maps_reference(image: np.ndarray, patch_size: int, num_scales: int) -> list[np.ndarray]:
    """Plain NumPy twin (tests only): explicit area-down, nearest-up, MSE per patch."""
    g = gray_plane_reference(image).astype(np.float64)
    maps = []
    for s in range(num_scales):
        f = 2**s
        h, w = g.shape[0] // f * f, g.shape[1] // f * f
        down = g[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))
        err = (g[:h, :w] - np.repeat(np.repeat(down, f, axis=0), f, axis=1)) ** 2
        maps.append(patch_means(err, patch_size * f, 1)[0])
    return maps


register_scorer("upsample", rows_pyramid(upsample_pyramid), upsample_maps_reference, DEFAULT_THRESHOLDS,
                units="squared gray levels",
                description="MSE of the gray patch against its 2^s area-down, nearest-up version", builtin=True)
