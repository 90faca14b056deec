"""Window-compatible patch layouts for windowed ViTs (SAM / ViTDet-style window attention).

No token may straddle a border of ``window``-cell windows: `patchify_windowed` /
`layout_from_scores_windowed` make straddling cells ineligible in the selection, and
`split_for_windows` splits straddling tokens of an existing layout into children. ``window=0``: no
windows, layouts unchanged (docs/dense.md).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .config import APTConfig
from .layout import PatchLayout, checked_image, layout_from_scores
from .scoring import score_maps


def _check_window(window: int) -> int:
    if int(window) != window or window < 0:
        raise ValueError(f"window must be an int >= 0 (base cells; 0 = no windows), got {window!r}")
    return int(window)


def straddling(y_cells: np.ndarray, x_cells: np.ndarray, cells: np.ndarray | int, window: int) -> np.ndarray:
    """Boolean mask: the token at base cell (y, x) covering ``cells`` x ``cells`` base cells crosses a
    border of the ``window``-cell window grid."""
    if window == 0:
        return np.zeros(np.shape(y_cells), bool)
    y = np.asarray(y_cells, np.int64)
    x = np.asarray(x_cells, np.int64)
    f = np.asarray(cells, np.int64)
    return ((y % window) + f > window) | ((x % window) + f > window)


def count_straddling(layout: PatchLayout, window: int) -> int:
    """Tokens of ``layout`` that cross a window border (0: the layout fits the windows)."""
    window = _check_window(window)
    p = layout.patch_size
    return int(straddling(layout.y // p, layout.x // p, 1 << layout.scale.astype(np.int64), window).sum())


def layout_from_scores_windowed(maps: Sequence[np.ndarray], image_size: tuple[int, int], cfg: APTConfig,
                                window: int) -> PatchLayout:
    """`layout_from_scores` with every scale-s cell (s >= 1) that would straddle a window border scored
    +inf (on copies of ``maps``), so the selection never keeps it."""
    window = _check_window(window)
    maps = [np.array(m, np.float32, copy=True) for m in maps]
    for s in range(1, len(maps) if window else 0):
        f = 1 << s
        h, w = maps[s].shape
        maps[s][straddling(np.arange(h) * f, 0, f, window), :] = np.inf
        maps[s][:, straddling(0, np.arange(w) * f, f, window)] = np.inf
    return layout_from_scores(maps, image_size, cfg)


def patchify_windowed(image: np.ndarray, cfg: Optional[APTConfig] = None, window: int = 14) -> PatchLayout:
    """`patchify` for a windowed ViT: no token crosses a border of the ``window``-cell windows."""
    cfg = cfg or APTConfig()
    image, H, W = checked_image(image, cfg.patch_size)
    maps = score_maps(image, cfg.patch_size, cfg.num_scales, cfg.scorer)
    return layout_from_scores_windowed(maps, (H, W), cfg, window)


def split_for_windows(layout: PatchLayout, window: int) -> PatchLayout:
    """``layout`` with every token that crosses a window border replaced by its four children
    (recursively), in `PatchLayout` order (coarsest first, raster order inside a scale)."""
    window = _check_window(window)
    p = layout.patch_size
    y = layout.y.astype(np.int64) // p
    x = layout.x.astype(np.int64) // p
    s = layout.scale.astype(np.int64)
    bad = straddling(y, x, 1 << s, window)
    if not bad.any():
        return layout
    keep = []
    while len(s):
        keep.append((y[~bad], x[~bad], s[~bad]))
        y, x, s = y[bad], x[bad], s[bad]
        h = 1 << (s - 1)  # s >= 1 here: a single cell never straddles
        y = np.concatenate([y, y, y + h, y + h])
        x = np.concatenate([x, x + h, x, x + h])
        s = np.concatenate([s - 1] * 4)
        bad = straddling(y, x, 1 << s, window)
    y, x, s = (np.concatenate(v) for v in zip(*keep))
    order = np.lexsort((x, y, -s))
    return PatchLayout(y=(y[order] * p).astype(np.int32), x=(x[order] * p).astype(np.int32),
                       scale=s[order].astype(np.int8), image_size=tuple(layout.image_size), patch_size=p,
                       num_scales=layout.num_scales)


def pack_windowed(images: Sequence[np.ndarray], cfg: Optional[APTConfig] = None, window: int = 14,
                  labels: Optional[Sequence[int]] = None, num_prefix_tokens: int = 0, num_padding: int = 0,
                  layouts: Optional[Sequence[PatchLayout]] = None):
    """`pack_images` for a windowed ViT (e.g. ``window=model.window_size`` of an APT SAM model):
    layouts from `patchify_windowed`, or the given ``layouts`` passed through `split_for_windows`."""
    from .assemble import layouts_of, pack_images

    cfg = cfg or APTConfig()
    if layouts is None:
        layouts = layouts_of(images, lambda im: patchify_windowed(im, cfg, window))
    else:
        layouts = [split_for_windows(lay, window) for lay in layouts]
    return pack_images(images, cfg, labels=labels, num_prefix_tokens=num_prefix_tokens, layouts=layouts,
                       num_padding=num_padding)


__all__ = ["count_straddling", "layout_from_scores_windowed", "pack_windowed", "patchify_windowed", "split_for_windows",
           "straddling"]
