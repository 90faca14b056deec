"""mmseg's PhotoMetricDistortion on a uint8 RGB image: one Numba pass, with its NumPy reference.

Each with probability 1/2: brightness, contrast (first or last), saturation and hue (HSV), each
clipped to uint8 as mmseg does; brightness and contrast are exact 256-entry tables. Draws come
from the sample's generator; masks never pass through here.
"""
from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["photo_metric_distortion", "photometric_kernel", "photometric_reference"]


def _affine_lut(lut: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """``lut`` followed by mmseg's ``convert``: ``clip(x * alpha + beta, 0, 255)`` truncated to uint8."""
    return np.clip(lut.astype(np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(np.uint8)


def photo_metric_distortion(img: np.ndarray, rng: np.random.Generator, brightness: float = 32,
                            contrast: tuple[float, float] = (0.5, 1.5), saturation: tuple[float, float] = (0.5, 1.5),
                            hue: int = 18) -> np.ndarray:
    """mmseg's PhotoMetricDistortion of a uint8 HxWx3 RGB image with draws from ``rng`` (a new array)."""
    pre = np.arange(256, dtype=np.uint8)
    if rng.integers(2):
        pre = _affine_lut(pre, beta=rng.uniform(-brightness, brightness))
    contrast_last = rng.integers(2) == 0
    if not contrast_last and rng.integers(2):
        pre = _affine_lut(pre, alpha=rng.uniform(*contrast))
    sat = float(rng.uniform(*saturation)) if rng.integers(2) else 1.0
    shift = int(rng.integers(-hue, hue)) if rng.integers(2) else 0
    post = _affine_lut(np.arange(256, dtype=np.uint8), alpha=rng.uniform(*contrast)) \
        if contrast_last and rng.integers(2) else np.arange(256, dtype=np.uint8)
    out = np.empty_like(img)
    photometric_kernel(np.ascontiguousarray(img), out, pre, post, sat, 2.0 * shift)
    return out


@njit(cache=True, nogil=True)
def photometric_kernel(img, out, pre, post, sat, hue_deg):
    """``out = post[hsv_adjust(pre[img], sat, hue_deg)]`` pixel by pixel (HSV skipped when it is a no-op)."""
    hsv = sat != 1.0 or hue_deg != 0.0
    for i in range(img.shape[0]):
        for j in range(img.shape[1]):
            r, g, b = int(pre[img[i, j, 0]]), int(pre[img[i, j, 1]]), int(pre[img[i, j, 2]])
            if hsv:
                r, g, b = _adjust_hsv(float(r), float(g), float(b), sat, hue_deg)
            out[i, j, 0] = post[r]
            out[i, j, 1] = post[g]
            out[i, j, 2] = post[b]


@njit(cache=True, nogil=True, inline="always")
def _adjust_hsv(r, g, b, sat, hue_deg):
    v = max(r, g, b)
    d = v - min(r, g, b)
    s = d / v if v > 0 else 0.0
    if d == 0:
        h = 0.0
    elif v == r:
        h = 60.0 * ((g - b) / d)
    elif v == g:
        h = 60.0 * ((b - r) / d) + 120.0
    else:
        h = 60.0 * ((r - g) / d) + 240.0
    h += hue_deg  # in [-396, 396): back into [0, 360)
    if h < 0.0:
        h += 360.0
    elif h >= 360.0:
        h -= 360.0
    c = v * min(s * sat, 1.0)
    hp = h / 60.0
    k = int(hp)
    f = hp - k
    x = c * f if k % 2 == 0 else c * (1.0 - f)
    m = v - c
    c, x, z = int(c + m + 0.5), int(x + m + 0.5), int(m + 0.5)
    if k == 0:
        return c, x, z
    if k == 1:
        return x, c, z
    if k == 2:
        return z, c, x
    if k == 3:
        return z, x, c
    if k == 4:
        return x, z, c
    return c, z, x


def photometric_reference(img: np.ndarray, pre: np.ndarray, post: np.ndarray, sat: float, hue_deg: float) -> np.ndarray:
    """Plain NumPy `photometric_kernel` (for tests)."""
    x = pre[img].astype(np.float64)
    if sat != 1.0 or hue_deg != 0.0:
        r, g, b = x[..., 0], x[..., 1], x[..., 2]
        v, d = x.max(-1), x.max(-1) - x.min(-1)
        s = np.where(v > 0, d / np.where(v > 0, v, 1), 0.0)
        safe = np.where(d > 0, d, 1)
        h = np.where(v == r, 60.0 * ((g - b) / safe), np.where(v == g, 60.0 * ((b - r) / safe) + 120.0,
                                                              60.0 * ((r - g) / safe) + 240.0))
        h = np.where(d == 0, 0.0, h) + hue_deg
        h = np.where(h < 0, h + 360.0, np.where(h >= 360.0, h - 360.0, h))
        c = v * np.minimum(s * sat, 1.0)
        hp = h / 60.0
        k = hp.astype(np.int64)
        f = hp - k
        xx = np.where(k % 2 == 0, c * f, c * (1.0 - f))
        zero = np.zeros_like(c)
        table = [(c, xx, zero), (xx, c, zero), (zero, c, xx), (zero, xx, c), (xx, zero, c), (c, zero, xx)]
        rgb = [np.select([k == n for n in range(6)], [t[ch] for t in table]) for ch in range(3)]
        x = np.floor(np.stack(rgb, -1) + (v - c)[..., None] + 0.5)
    return post[x.astype(np.uint8)]
