"""Draw a `PatchLayout` over its image: patch borders, each scale tinted its own colour."""
from __future__ import annotations

import numpy as np

from .layout import PatchLayout

#: RGB tint per scale, finest first (scale 0 is left untinted).
SCALE_COLORS = np.array([[0, 0, 0], [30, 144, 255], [255, 140, 0], [50, 205, 50], [220, 20, 60], [148, 0, 211]], np.uint8)


def draw_layout(image: np.ndarray, layout: PatchLayout, alpha: float = 0.35, border: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Return a copy of ``image`` (uint8 HxWx3) with the layout drawn on it."""
    if image.shape[:2] != tuple(layout.image_size):
        raise ValueError(f"image is {image.shape[:2]} but the layout was made for {layout.image_size}")
    p = layout.patch_size
    grid = layout.scale_grid()
    scale_px = np.repeat(np.repeat(grid, p, 0), p, 1)
    out = image.astype(np.float32).copy()
    tint = SCALE_COLORS[np.clip(scale_px, 0, len(SCALE_COLORS) - 1)].astype(np.float32)
    mask = scale_px > 0
    out[mask] = (1 - alpha) * out[mask] + alpha * tint[mask]
    # borders: a pixel is on a border where the token id changes to its right or below
    ids = np.full(layout.grid_size, -1, np.int64)
    cell_y, cell_x = layout.y // p, layout.x // p
    for t, (i, j, s) in enumerate(zip(cell_y, cell_x, layout.scale)):
        f = 1 << int(s)
        ids[i:i + f, j:j + f] = t
    id_px = np.repeat(np.repeat(ids, p, 0), p, 1)
    edge = np.zeros(id_px.shape, bool)
    edge[:, :-1] |= id_px[:, :-1] != id_px[:, 1:]
    edge[:-1, :] |= id_px[:-1, :] != id_px[1:, :]
    edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
    out[edge] = border
    return out.round().astype(np.uint8)
