"""Grayscale shared by all scorers: ``0.2989 R + 0.5870 G + 0.1140 B`` in float32 as torch evaluates
it; kernels read images as a contiguous 2-D uint8 view ``(H, W * C)`` (`rows_pyramid` hands it over);
`patch_means` is the per-patch mean of the references."""
from __future__ import annotations

import numpy as np
from numba import njit

GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)
WR, WG, WB = (np.float32(w) for w in GRAY_WEIGHTS)


def as_rows(image: np.ndarray) -> tuple[np.ndarray, int]:
    """``(H, W*C)`` uint8 view of a checked image and its channel count C (1 or 3)."""
    channels = 1 if image.ndim == 2 else 3
    return image.reshape(image.shape[0], image.shape[1] * channels), channels


@njit(cache=True, nogil=True, inline="always")
def gray_row(row, channels, out):
    """One image row (``W*C`` uint8) -> float32 gray values in ``out[:W]``."""
    if channels == 1:
        for x in range(out.shape[0]):
            out[x] = np.float32(row[x])
    else:
        for x in range(out.shape[0]):
            out[x] = (WR * np.float32(row[3 * x]) + WG * np.float32(row[3 * x + 1])) + WB * np.float32(row[3 * x + 2])


@njit(cache=True, nogil=True)
def gray_plane(rows, channels):
    """``(H, W*C)`` uint8 -> float32 ``(H, W)`` gray image."""
    H = rows.shape[0]
    W = rows.shape[1] // channels
    out = np.empty((H, W), np.float32)
    for y in range(H):
        gray_row(rows[y], channels, out[y])
    return out


def gray_plane_reference(image: np.ndarray) -> np.ndarray:
    """Plain NumPy twin of `gray_plane` (tests only)."""
    if image.ndim == 2:
        return image.astype(np.float32)
    f = image.astype(np.float32)
    return ((WR * f[..., 0]) + (WG * f[..., 1])) + (WB * f[..., 2])


def patch_means(plane: np.ndarray, patch_size: int, num_scales: int) -> list[np.ndarray]:
    """float32 mean of ``plane`` over every whole patch of every scale (the references' last step)."""
    maps = []
    for s in range(num_scales):
        size = patch_size * 2**s
        h, w = plane.shape[0] // size, plane.shape[1] // size
        maps.append(plane[:h * size, :w * size].reshape(h, size, w, size).mean(axis=(1, 3)).astype(np.float32))
    return maps


def rows_pyramid(kernel):
    """The registry's pyramid kernel for a Numba ``kernel(rows, channels, p, num_scales, flat, offsets)``
    that writes every scale from the ``(H, W*C)`` view of the image."""

    def pyramid(image: np.ndarray, p: int, num_scales: int, first: int, flat: np.ndarray,
                offsets: np.ndarray) -> None:
        rows, channels = as_rows(image)
        kernel(rows, channels, p, num_scales, flat, offsets)

    return pyramid
