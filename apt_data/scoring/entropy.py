"""Shannon entropy of the grayscale histogram, the paper's patch score.

512 bins over [0, 255] with torch.histc semantics (``bin = floor(g / 255 * 512)`` in float32,
g == 255 in the last bin), entropy in bits; tests check the bins against ``torch.histc`` for
every gray value an RGB pixel can produce.

Cost O(pixels + patches x bins): each pixel is counted once into the histogram of its patch at
the finest scale that is needed (scale 0 for `score_maps`; scale 1 for patch selection, which
never reads scale-0 scores), and a coarser patch's histogram is the sum of its four children's.
The pyramid is streamed one row of patches at a time, so the histograms in flight stay in L1/L2
cache. Entropy of a histogram of n samples is ``log2(n) - sum(c log2 c) / n``, ``c log2 c``
from a table, skipping runs of 8 empty bins.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ._gray import gray_plane_reference, gray_row

NUM_BINS = 512


@njit(cache=True, nogil=True, inline="always")
def _row_bins(row, channels, gray, out):
    gray_row(row, channels, gray)
    for x in range(out.shape[0]):
        b = np.int32((gray[x] / np.float32(255.0)) * np.float32(512.0))
        out[x] = b if b < 511 else 511


@njit(cache=True, nogil=True)
def _histogram_entropy(h, n, log2_n, clog):
    a0 = 0.0
    a1 = 0.0
    for k in range(0, 512, 8):
        if (h[k] | h[k + 1] | h[k + 2] | h[k + 3] | h[k + 4] | h[k + 5] | h[k + 6] | h[k + 7]) == 0:
            continue
        a0 += (clog[h[k]] + clog[h[k + 1]]) + (clog[h[k + 2]] + clog[h[k + 3]])
        a1 += (clog[h[k + 4]] + clog[h[k + 5]]) + (clog[h[k + 6]] + clog[h[k + 7]])
    return np.float32(log2_n - (a0 + a1) / n)


@njit(cache=True, nogil=True)
def entropy_pyramid(rows, channels, p, num_scales, first, clog, flat, offsets):
    """Entropy map of scales ``first..num_scales-1`` into ``flat`` (scale s at ``offsets[s]``).

    ``rows`` is the ``(H, W*C)`` uint8 view of the image. Scales below ``first`` are not written.
    """
    H = rows.shape[0]
    W = rows.shape[1] // channels
    hs = np.empty(num_scales, np.int64)
    ws = np.empty(num_scales, np.int64)
    for s in range(num_scales):
        hs[s] = H // (p << s)
        ws[s] = W // (p << s)
    if hs[first] == 0 or ws[first] == 0:
        return
    # one row of histograms per scale, reused row after row
    scratch = np.zeros((num_scales, ws[first], 512), np.int32)
    gray = np.empty(W, np.float32)
    bins = np.empty(W, np.uint16)
    size = p << first
    wf = ws[first]
    for i_first in range(hs[first]):
        for r in range(size):
            _row_bins(rows[i_first * size + r], channels, gray, bins)
            for j in range(wf):
                hrow = scratch[first, j]
                for x in range(j * size, (j + 1) * size):
                    hrow[bins[x]] += 1
        # close the finished row at this scale and at every coarser scale it completes
        s = first
        i = i_first
        while True:
            n = (p << s) * (p << s)
            log2_n = np.log2(np.float64(n))
            has_parent = s + 1 < num_scales and (i >> 1) < hs[s + 1]
            out0 = offsets[s] + i * ws[s]
            for j in range(ws[s]):
                h = scratch[s, j]
                flat[out0 + j] = _histogram_entropy(h, n, log2_n, clog)
                if has_parent and (j >> 1) < ws[s + 1]:
                    ph = scratch[s + 1, j >> 1]
                    for k in range(512):
                        ph[k] += h[k]
                        h[k] = 0
                else:
                    h[:] = 0
            if has_parent and (i & 1) == 1:
                s += 1
                i >>= 1
            else:
                break


_CLOG_CACHE: dict[int, np.ndarray] = {}


def clog_table(max_count: int) -> np.ndarray:
    """float64 table of ``c * log2(c)`` for c in 0..max_count (0 log 0 = 0)."""
    t = _CLOG_CACHE.get(max_count)
    if t is None:
        c = np.arange(max_count + 1, dtype=np.float64)
        t = np.zeros_like(c)
        t[1:] = c[1:] * np.log2(c[1:])
        _CLOG_CACHE[max_count] = t
    return t


def gray_bins_reference(image: np.ndarray) -> np.ndarray:
    """Bin index of every pixel (tests only)."""
    gray = gray_plane_reference(image)
    return np.minimum(((gray / np.float32(255.0)) * np.float32(512.0)).astype(np.int64), NUM_BINS - 1)


def entropy_maps_reference(image: np.ndarray, patch_size: int, num_scales: int) -> list[np.ndarray]:
    """Plain NumPy twin of `entropy_pyramid` (tests only): every patch histogrammed directly."""
    bins = gray_bins_reference(image)
    maps = []
    for s in range(num_scales):
        size = patch_size * 2**s
        h, w = image.shape[0] // size, image.shape[1] // size
        m = np.zeros((h, w), np.float32)
        for i in range(h):
            for j in range(w):
                counts = np.bincount(bins[i * size:(i + 1) * size, j * size:(j + 1) * size].ravel(), minlength=NUM_BINS)
                prob = counts[counts > 0] / counts.sum()
                m[i, j] = -(prob * np.log2(prob)).sum()
        maps.append(m)
    return maps
