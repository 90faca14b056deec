"""Quadtree patch-size selection: `patchify(image, cfg) -> PatchLayout`, the same for every scorer.

Scores come from the scorer registry (a fused layout kernel, else the full pyramid), then
`select_patches` picks the patches; nothing here knows a particular scorer.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from numba import njit

from .config import APTConfig
from .image import check_image
from .scoring import get_scorer, map_shapes, score_flat


@dataclass(frozen=True)
class PatchLayout:
    """Where the tokens of one image are: int32 top-left ``y``, ``x`` in pixels and int8 ``scale`` per
    token (``patch_size * 2**scale`` px), grouped by scale coarsest first, raster order inside."""

    y: np.ndarray
    x: np.ndarray
    scale: np.ndarray
    image_size: tuple[int, int]
    patch_size: int
    num_scales: int

    def __len__(self) -> int:
        return int(self.scale.shape[0])

    @property
    def grid_size(self) -> tuple[int, int]:
        """Base grid (rows, cols) of the image: what a plain ViT would see."""
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def uniform_tokens(self) -> int:
        """Tokens a plain ViT uses for this image (the base grid)."""
        h, w = self.grid_size
        return h * w

    @property
    def sizes(self) -> np.ndarray:
        """Side in pixels of each token."""
        return (self.patch_size << self.scale.astype(np.int32)).astype(np.int32)

    def counts(self) -> np.ndarray:
        """Number of tokens at each scale, finest first: int64 ``[num_scales]``."""
        return np.bincount(self.scale.astype(np.int64), minlength=self.num_scales)

    def scale_grid(self) -> np.ndarray:
        """int8 base-grid map of the scale of the token covering each base cell (dense views)."""
        grid = np.full(self.grid_size, -1, dtype=np.int8)
        _paint_scales(self.y, self.x, self.scale, self.patch_size, grid)
        return grid


@njit(cache=True, nogil=True)
def _paint_scales(ys, xs, scales, p, grid):
    for t in range(scales.shape[0]):
        f = 1 << scales[t]
        i0 = ys[t] // p
        j0 = xs[t] // p
        for i in range(i0, i0 + f):
            for j in range(j0, j0 + f):
                grid[i, j] = scales[t]


@njit(cache=True, nogil=True)
def select_patches(flat, offsets, hs, ws, thresholds, p, num_scales):
    """Coarsest-first quadtree selection -> (y, x, scale): a scale-s cell is kept where its score <
    ``thresholds[s-1]`` and no kept coarser patch covers it; uncovered base cells are scale 0."""
    h0 = hs[0]
    w0 = ws[0]
    covered = np.zeros((h0, w0), np.bool_)
    n_max = h0 * w0
    ys = np.empty(n_max, np.int32)
    xs = np.empty(n_max, np.int32)
    ss = np.empty(n_max, np.int8)
    n = 0
    for s in range(num_scales - 1, 0, -1):
        thr = thresholds[s - 1]
        f = 1 << s
        base = offsets[s]
        for i in range(hs[s]):
            for j in range(ws[s]):
                if covered[i * f, j * f]:
                    continue  # inside a kept coarser patch (cells are aligned: all or nothing)
                if flat[base + i * ws[s] + j] < thr:
                    for a in range(i * f, i * f + f):
                        for b in range(j * f, j * f + f):
                            covered[a, b] = True
                    ys[n] = i * f * p
                    xs[n] = j * f * p
                    ss[n] = s
                    n += 1
    for i in range(h0):
        for j in range(w0):
            if not covered[i, j]:
                ys[n] = i * p
                xs[n] = j * p
                ss[n] = 0
                n += 1
    return ys[:n].copy(), xs[:n].copy(), ss[:n].copy()


def select_patches_reference(maps: list[np.ndarray], thresholds, patch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Plain NumPy twin of `select_patches` (tests only), written with masks per scale."""
    num_scales = len(maps)
    h0, w0 = maps[0].shape
    covered = np.zeros((h0, w0), bool)
    out = []
    for s in range(num_scales - 1, 0, -1):
        f = 2**s
        hs, ws = maps[s].shape
        parent_free = ~covered[: hs * f: f, : ws * f: f]
        keep = (maps[s].astype(np.float64) < np.float64(thresholds[s - 1])) & parent_free
        ii, jj = np.nonzero(keep)
        out.append((ii * f * patch_size, jj * f * patch_size, np.full(len(ii), s)))
        up = np.kron(keep, np.ones((f, f), bool))
        covered[: hs * f, : ws * f] |= up
    ii, jj = np.nonzero(~covered)
    out.append((ii * patch_size, jj * patch_size, np.zeros(len(ii), int)))
    y = np.concatenate([o[0] for o in out]).astype(np.int32)
    x = np.concatenate([o[1] for o in out]).astype(np.int32)
    sc = np.concatenate([o[2] for o in out]).astype(np.int8)
    return y, x, sc


def checked_image(image: np.ndarray, patch_size: int) -> tuple[np.ndarray, int, int]:
    """`check_image`, then the sides checked against the patch size: (image, H, W)."""
    image = check_image(image)
    H, W = image.shape[:2]
    if H % patch_size or W % patch_size:
        raise ValueError(f"image of size {H}x{W} (HxW): both sides must be multiples of patch_size={patch_size}; "
                         "resize or crop it first")
    return image, H, W


def patchify(image: np.ndarray, cfg: APTConfig | None = None) -> PatchLayout:
    """Choose a patch size for every region of ``image`` (uint8 HxWx3 or HxW, sides multiples of
    ``cfg.patch_size``; strips that fit no larger patch get the finer scales)."""
    cfg = cfg or APTConfig()
    image, H, W = checked_image(image, cfg.patch_size)
    p = cfg.patch_size
    fused = get_scorer(cfg.scorer).layout_kernel
    if fused is None:
        flat, _, _ = score_flat(image, p, cfg.num_scales, cfg.scorer, need_base=False)
        return layout_from_flat_scores(flat, (H, W), cfg)
    hs, ws, offsets, thr = _grid_constants(H, W, cfg)
    flat = fused(image, p, cfg.num_scales, thr, hs, ws, offsets)
    if not (isinstance(flat, np.ndarray) and flat.dtype == np.float32 and flat.shape == (offsets[-1],)
            and flat.flags.c_contiguous):
        raise ValueError(f"scorer {cfg.scorer!r}: its layout kernel must return contiguous float32 "
                         f"[{offsets[-1]}] scores, "
                         f"got {getattr(flat, 'dtype', type(flat))} {getattr(flat, 'shape', '')}")
    y, x, scale = select_patches(flat, offsets, hs, ws, thr, p, cfg.num_scales)
    return PatchLayout(y=y, x=x, scale=scale, image_size=(H, W), patch_size=p, num_scales=cfg.num_scales)


def layout_from_scores(maps: list[np.ndarray], image_size: tuple[int, int], cfg: APTConfig) -> PatchLayout:
    """The layout `patchify` would give from precomputed ``maps`` (shaped as `score_maps` for
    ``image_size``; maps[0] is not read)."""
    H, W = image_size
    p = cfg.patch_size
    if H % p or W % p:
        raise ValueError(f"image of size {H}x{W} (HxW): both sides must be multiples of patch_size={p}")
    if len(maps) != cfg.num_scales:
        raise ValueError(f"got {len(maps)} score maps for num_scales={cfg.num_scales}")
    shapes = map_shapes(H, W, p, cfg.num_scales)
    for s, (m, shape) in enumerate(zip(maps, shapes)):
        if tuple(m.shape) != shape:
            raise ValueError(f"score map of scale {s} has shape {tuple(m.shape)}, expected {shape} for a {H}x{W} image")
    flat = np.concatenate([np.asarray(m, np.float32).ravel() for m in maps])
    return layout_from_flat_scores(flat, image_size, cfg)


def layout_from_flat_scores(flat: np.ndarray, image_size: tuple[int, int], cfg: APTConfig) -> PatchLayout:
    """`layout_from_scores` for all scales' maps flattened row-major and concatenated, finest first
    (the ``.npy`` member of a shard), without splitting them."""
    H, W = int(image_size[0]), int(image_size[1])
    hs, ws, offsets, thr = _grid_constants(H, W, cfg)
    if not (isinstance(flat, np.ndarray) and flat.dtype == np.float32 and flat.ndim == 1 and flat.flags.c_contiguous
            and flat.flags.writeable):  # (a read-only array would make Numba compile another version)
        flat = np.array(flat, dtype=np.float32).reshape(-1)
    if flat.size != offsets[-1]:
        raise ValueError(f"{flat.size} scores given; a {H}x{W} image with {cfg.num_scales} scales has {offsets[-1]}")
    y, x, scale = select_patches(flat, offsets, hs, ws, thr, cfg.patch_size, cfg.num_scales)
    return PatchLayout(y=y, x=x, scale=scale, image_size=(H, W), patch_size=cfg.patch_size, num_scales=cfg.num_scales)


@functools.lru_cache(maxsize=4096)  # keep-aspect data sets have many sizes: stay bounded
def _grid_constants(H: int, W: int, cfg: APTConfig):
    """(hs, ws, offsets, thresholds) arrays of `select_patches` for an image size and config, built once
    (a loader reuses them for every image of a size)."""
    shapes = map_shapes(H, W, cfg.patch_size, cfg.num_scales)
    hs = np.array([h for h, _ in shapes], dtype=np.int64)
    ws = np.array([w for _, w in shapes], dtype=np.int64)
    offsets = np.cumsum(np.concatenate([[0], hs * ws]), dtype=np.int64)
    thr = np.asarray(cfg.thresholds, dtype=np.float64).reshape(-1)
    return hs, ws, offsets, (thr if thr.size else np.zeros(1, np.float64))  # num_scales == 1: never read


__all__ = ["PatchLayout", "layout_from_scores", "patchify", "select_patches", "select_patches_reference"]
