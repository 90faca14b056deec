"""The entropy scorer (the paper's): Shannon entropy of each patch's grayscale histogram, in bits.

512 bins with torch.histc semantics (``floor(g / 255 * 512)`` in float32, 255 in the last bin).
Two kernels bin with `band_bins` and share `_histogram_entropy`, so their scores are bit-identical:
`entropy_pyramid` (every patch of every scale, coarse histograms summed from children) and
`entropy_layout` (only what the coarsest-first selection reads, mostly decided by bounds).
Every kernel they call is defined here: Numba's cache checks only the defining file's timestamp.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit

from ._gray import WB, WG, WR, as_rows, gray_plane_reference
from .registry import register_scorer

NUM_BINS = 512


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
def band_bins(rows, channels, y0, nrows, ncols, r, g, b, out):
    """``out[rr, x]`` = bin of pixel (y0 + rr, x), for x < ncols; RGB split into planes first (SIMD)."""
    for rr in range(nrows):
        row = rows[y0 + rr]
        o = out[rr]
        if channels == 3:
            for x in range(ncols):
                r[x] = row[3 * x]
                g[x] = row[3 * x + 1]
                b[x] = row[3 * x + 2]
            for x in range(ncols):
                gray = (WR * np.float32(r[x]) + WG * np.float32(g[x])) + WB * np.float32(b[x])
                q = np.int32((gray / np.float32(255.0)) * np.float32(512.0))
                o[x] = q if q < 511 else 511
        else:
            for x in range(ncols):
                q = np.int32((np.float32(row[x]) / np.float32(255.0)) * np.float32(512.0))
                o[x] = q if q < 511 else 511


@njit(cache=True, nogil=True)
def entropy_pyramid(rows, channels, p, num_scales, first, clog, flat, offsets):
    """Entropy map of scales ``first..num_scales-1`` into ``flat`` (scale s at ``offsets[s]``) from the
    ``(H, W*C)`` uint8 view ``rows``; lower scales are not written."""
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
    size = p << first
    wf = ws[first]
    ncols = wf * size
    r = np.empty(ncols, np.uint8)
    g = np.empty(ncols, np.uint8)
    b = np.empty(ncols, np.uint8)
    band = np.empty((size, ncols), np.uint16)
    for i_first in range(hs[first]):
        band_bins(rows, channels, i_first * size, size, ncols, r, g, b, band)
        for rr in range(size):
            bins = band[rr]
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


# ------------------------------------------------------------------------ layout kernel
# Bounds that decide most threshold comparisons without the exact entropy H of a histogram
# (n samples, counts c, k non-empty bins):  log2(n^2 / sum c^2) <= H <= log2(k)  (Renyi order 2
# and Hartley entropies).  A parent (4 equal children) satisfies
# mean(H_children) <= H_parent <= mean(H_children) + 2  (concavity; mixing 4 parts adds <= 2 bits).
# A bound decides only when it clears the threshold by BOUND_MARGIN, far above the float error
# (~1e-6 bits) of a computed entropy, so every decision equals the one the exact score gives.
BOUND_MARGIN = 1e-3
_U = np.uint64


@njit(cache=True, nogil=True, inline="always")
def _count_cell(bins, nrows, x0, ncols, sub):
    """Count one cell's pixels into four sub-histograms by row and column parity, so that equal
    neighbouring bins never update the same counter back to back."""
    for rr in range(0, nrows, 2):
        o0 = bins[rr]
        o1 = bins[rr + 1]
        for x in range(_U(x0), _U(x0 + ncols), _U(2)):  # unsigned: no negative-index wrap-around code
            sub[o0[x]] += 1
            sub[_U(512) + o1[x]] += 1
            sub[_U(1024) + o0[x + _U(1)]] += 1
            sub[_U(1536) + o1[x + _U(1)]] += 1


@njit(cache=True, nogil=True, inline="always")
def _merge_sub(sub, h, wide):
    """``h`` = the sum of the four (then cleared) sub-histograms; returns (sum c^2, non-empty bins).
    32-bit lanes unless ``wide`` (n >= 2**16 pixels)."""
    nz = np.uint32(0)
    sq = np.uint64(0)
    sq32 = np.uint32(0)
    for k in range(NUM_BINS):
        c = np.uint32(sub[k] + sub[k + 512] + sub[k + 1024] + sub[k + 1536])
        sub[k] = 0
        sub[k + 512] = 0
        sub[k + 1024] = 0
        sub[k + 1536] = 0
        h[k] = c
        if wide:
            sq += np.uint64(c) * np.uint64(c)
        else:
            sq32 = np.uint32(sq32 + np.uint32(c * c))
        nz = np.uint32(nz + min(c, np.uint32(1)))
    return (sq if wide else np.uint64(sq32)), nz


@njit(cache=True, nogil=True)
def entropy_layout(rows, channels, p, num_scales, thresholds, clog, sub, flat, offsets, hs, ws):
    """Decide every scale >= 1 patch the coarsest-first selection reads; write its score to ``flat``.

    Only scale-1 histograms are built from pixels; a patch is looked at only when no kept coarser
    patch covers it; bounds (`BOUND_MARGIN`) decide most comparisons. ``flat`` gets the exact score or
    a bound on the same side of the threshold, so `select_patches` gives the exact layout. ``sub``:
    ``[2048]`` zeroed uint16 counters (p <= 255), left zeroed.
    """
    L = num_scales - 1
    if L < 1 or hs[1] == 0 or ws[1] == 0:
        return
    c1 = 2 * p
    R = 1 << (L - 1)                       # scale-1 rows under one row of the coarsest scale
    ws1 = ws[1]
    ncols = ws1 * c1
    hist1 = np.empty((R, ws1, NUM_BINS), np.uint32)
    lo = np.empty((num_scales, R, ws1))    # bounds per scale, for the rows of the current band
    hi = np.empty((num_scales, R, ws1))
    bins = np.empty((c1, ncols), np.uint16)
    r = np.empty(ncols, np.uint8)
    g = np.empty(ncols, np.uint8)
    b = np.empty(ncols, np.uint8)
    tmp = np.empty(NUM_BINS, np.int64)
    stack = np.empty((4 * num_scales, 3), np.int64)
    two_log_n1 = 2.0 * np.log2(np.float64(c1 * c1))
    wide = c1 * c1 >= 1 << 16
    for i1 in range(hs[1]):
        band_bins(rows, channels, i1 * c1, c1, ncols, r, g, b, bins)
        slot = i1 & (R - 1)
        for j in range(ws1):
            _count_cell(bins, c1, j * c1, c1, sub)
            sq, nz = _merge_sub(sub, hist1[slot, j], wide)
            lo[1, slot, j] = two_log_n1 - np.log2(np.float64(sq))
            hi[1, slot, j] = np.log2(np.float64(nz))
        # close this row, and every coarser row it completes; decide the patches without a parent
        s = 1
        i = i1
        while True:
            parent_row = s < L and (i >> 1) < hs[s + 1]
            srow = i & ((1 << (L - s)) - 1)
            for j in range(ws[s]):
                if not (parent_row and (j >> 1) < ws[s + 1]):
                    _decide(s, i, j, L, p, thresholds, clog, hist1, lo, hi, tmp, stack, flat, offsets, ws)
            if not (parent_row and (i & 1) == 1):
                break
            prow = (i >> 1) & ((1 << (L - s - 1)) - 1)
            for jp in range(ws[s + 1]):  # a parent's bounds from its four children's
                j0 = 2 * jp
                a = (lo[s, srow - 1, j0] + lo[s, srow - 1, j0 + 1]) + (lo[s, srow, j0] + lo[s, srow, j0 + 1])
                z = (hi[s, srow - 1, j0] + hi[s, srow - 1, j0 + 1]) + (hi[s, srow, j0] + hi[s, srow, j0 + 1])
                lo[s + 1, prow, jp] = 0.25 * a
                hi[s + 1, prow, jp] = 0.25 * z + 2.0
            s += 1
            i >>= 1


@njit(cache=True, nogil=True)
def _decide(s0, i0, j0, L, p, thresholds, clog, hist1, lo, hi, tmp, stack, flat, offsets, ws):
    """Decide patch (s0, i0, j0), which no kept patch covers, and (depth first) its uncovered descendants."""
    R = hist1.shape[0]
    stack[0, 0] = s0
    stack[0, 1] = i0
    stack[0, 2] = j0
    top = 1
    while top > 0:
        top -= 1
        s = stack[top, 0]
        i = stack[top, 1]
        j = stack[top, 2]
        row = i & ((1 << (L - s)) - 1)
        thr = thresholds[s - 1]
        if lo[s, row, j] >= thr + BOUND_MARGIN:
            v = lo[s, row, j]
        elif hi[s, row, j] < thr - BOUND_MARGIN:
            v = hi[s, row, j]
        else:  # exact: the histogram is the sum of the scale-1 histograms below
            f = 1 << (s - 1)
            if f == 1:
                h = hist1[i & (R - 1), j]
                n = (2 * p) * (2 * p)
                v = _histogram_entropy(h, n, np.log2(np.float64(n)), clog)
            else:
                tmp[:] = 0
                for a in range(i * f, i * f + f):
                    for c in range(j * f, j * f + f):
                        hh = hist1[a & (R - 1), c]
                        for k in range(NUM_BINS):
                            tmp[k] += hh[k]
                n = (p << s) * (p << s)
                v = _histogram_entropy(tmp, n, np.log2(np.float64(n)), clog)
        v32 = np.float32(v)
        flat[offsets[s] + i * ws[s] + j] = v32
        if not (v32 < thr) and s > 1:  # not kept: its children are uncovered
            for a in range(2):
                for c in range(2):
                    stack[top, 0] = s - 1
                    stack[top, 1] = 2 * i + a
                    stack[top, 2] = 2 * j + c
                    top += 1


@njit(cache=True, nogil=True)
def _entropy_layout_flat(rows, channels, p, num_scales, thresholds, clog, hs, ws, offsets):
    """`entropy_layout` into a fresh buffer (undecided entries are unset and never read)."""
    flat = np.empty(offsets[num_scales], np.float32)
    sub = np.zeros(4 * 512, np.uint16)  # a scale-1 patch puts <= p*p pixels in each sub-histogram
    entropy_layout(rows, channels, p, num_scales, thresholds, clog, sub, flat, offsets, hs, ws)
    return flat


def entropy_layout_scores(image: np.ndarray, p: int, num_scales: int, thresholds: np.ndarray, hs: np.ndarray,
                          ws: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The registry's fused layout kernel (``hs``, ``ws``, ``offsets``: the image's `_grid_constants`)."""
    rows, channels = as_rows(image)
    clog = clog_table((p << (num_scales - 1)) ** 2)
    return _entropy_layout_flat(rows, channels, p, num_scales, thresholds, clog, hs, ws, offsets)  # p <= 255


def entropy_scores(image: np.ndarray, p: int, num_scales: int, first: int, flat: np.ndarray,
                   offsets: np.ndarray) -> None:
    """The registry's pyramid kernel: `entropy_pyramid` on a checked image."""
    rows, channels = as_rows(image)
    entropy_pyramid(rows, channels, p, num_scales, first, clog_table((p << (num_scales - 1)) ** 2), flat, offsets)


@functools.lru_cache(maxsize=None)
def clog_table(max_count: int) -> np.ndarray:
    """float64 table of ``c * log2(c)`` for c in 0..max_count (0 log 0 = 0)."""
    c = np.arange(max_count + 1, dtype=np.float64)
    t = np.zeros_like(c)
    t[1:] = c[1:] * np.log2(c[1:])
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


register_scorer(
    "entropy", entropy_scores, entropy_maps_reference, {3: (5.5, 4.0)},  # the paper's thresholds
    layout_kernel=entropy_layout_scores, units="bits",
    description="Shannon entropy of the 512-bin grayscale histogram (the paper's score)", builtin=True)
