"""`pack_images`: many images of any sizes -> one `PackedBatch` (token pixels per scale + metadata).

Token pixels are copied by a Numba kernel straight from each image into per-scale CHW arrays, so a
DataLoader worker hands the model ready tensors; a plain NumPy reference beside it is for tests.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from numba import njit
from torch.utils.data import get_worker_info

from .batch import PackedBatch
from .config import APTConfig
from .layout import PatchLayout, patchify


@njit(cache=True, nogil=True)
def extract_tokens(image, ys, xs, scales, patch_size, outs, next_row):
    """Copy every token of one HxWx3 image into ``outs[scale][next_row[scale]]`` as CHW.

    ``outs`` holds one ``[T_s, 3, p*2**s, p*2**s]`` uint8 array per scale; ``next_row`` (int64, one
    per scale) is advanced in place, so successive images fill the batch arrays one after another.
    Returns -1, or the index of the first token that does not fit (off the image, off the p-grid,
    unknown scale, or no row left): Numba does not bounds-check, so the kernel does.
    """
    H = image.shape[0]
    W = image.shape[1]
    for t in range(scales.shape[0]):
        s = scales[t]
        if s < 0 or s >= len(outs):
            return t
        size = patch_size << s
        out = outs[s]
        k = next_row[s]
        y0 = ys[t]
        x0 = xs[t]
        if (k >= out.shape[0] or y0 < 0 or x0 < 0 or y0 + size > H or x0 + size > W
                or y0 % patch_size != 0 or x0 % patch_size != 0):
            return t
        for r in range(size):  # read each pixel row once, write the three channel rows
            row = image[y0 + r]
            d0 = out[k, 0, r]
            d1 = out[k, 1, r]
            d2 = out[k, 2, r]
            for q in range(size):
                d0[q] = row[x0 + q, 0]
                d1[q] = row[x0 + q, 1]
                d2[q] = row[x0 + q, 2]
        next_row[s] = k + 1
    return -1


def extract_tokens_reference(image: np.ndarray, layout: PatchLayout, scale: int) -> np.ndarray:
    """Plain NumPy twin of `extract_tokens` (tests only): ``[T_s, 3, P, P]`` uint8 of one scale."""
    size = layout.patch_size << scale
    sel = np.nonzero(layout.scale == scale)[0]
    out = np.zeros((len(sel), 3, size, size), np.uint8)
    for k, t in enumerate(sel):
        y, x = int(layout.y[t]), int(layout.x[t])
        out[k] = image[y:y + size, x:x + size].transpose(2, 0, 1)
    return out


class _Arena:
    """Tensors of one dtype carved out of a single storage, in shared memory inside DataLoader
    workers (as default_collate does): sending a batch to the main process then moves one
    storage per dtype instead of one per tensor, and copies nothing."""

    def __init__(self, dtype, sizes: list[int], shared: bool):
        import torch

        self.dtype, self.offset = dtype, 0
        total = max(1, sum(sizes))
        if shared:
            self.storage = torch.UntypedStorage._new_shared(total * torch.empty(0, dtype=dtype).element_size())
        else:
            self.storage = torch.empty(total, dtype=dtype).untyped_storage()

    def take(self, shape: tuple):
        import torch

        n = int(np.prod(shape))
        t = torch.empty(0, dtype=self.dtype).set_(self.storage, self.offset, shape)
        self.offset += n
        return t


def _as_rgb(image: np.ndarray, i: int) -> np.ndarray:
    """Image ``i`` as a C-contiguous uint8 HxWx3 array; gray HxW / HxWx1 repeated to 3 channels."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image {i}: expected a numpy array, got {type(image).__name__} "
                         "(decode files with apt_data.load_image)")
    if image.dtype != np.uint8:
        raise ValueError(f"image {i}: expected dtype uint8, got {image.dtype} (convert with apt_data.to_rgb_uint8)")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:  # gray: documented conversion, the channel repeated 3 times
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image {i}: expected shape HxWx3, HxW or HxWx1, got {image.shape}"
                         + (" (RGBA: convert with apt_data.to_rgb_uint8)" if image.ndim == 3 and image.shape[2] == 4 else ""))
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image {i}: empty image of shape {image.shape}")
    return np.ascontiguousarray(image)


def _check_layout(lay: PatchLayout, image: np.ndarray, cfg: APTConfig, i: int) -> None:
    """A given layout must be for this image and config (token bounds are checked by the kernel)."""
    H, W = image.shape[:2]
    if (tuple(lay.image_size) != (H, W) or lay.patch_size != cfg.patch_size or lay.num_scales != cfg.num_scales):
        raise ValueError(f"image {i}: layout is for a {lay.image_size} image with patch {lay.patch_size} and "
                         f"{lay.num_scales} scales, not {(H, W)} with {cfg.patch_size} and {cfg.num_scales}")
    if not (lay.y.shape == lay.x.shape == lay.scale.shape and lay.y.ndim == 1) or len(lay.y) == 0:
        raise ValueError(f"image {i}: layout arrays y, x, scale must be 1-D, non-empty and of one length")


def pack_images(images: Sequence[np.ndarray], cfg: Optional[APTConfig] = None, labels: Optional[Sequence[int]] = None,
                num_prefix_tokens: int = 1, layouts: Optional[Sequence[PatchLayout]] = None,
                num_padding: int = 0) -> PackedBatch:
    """Pack uint8 HxWx3 images (HxW or HxWx1 gray: the channel repeated 3 times) into one `PackedBatch`.

    ``layouts`` (one per image) skips `patchify` when they are already known. Each image's segment
    is ``num_prefix_tokens`` prefix slots, then its tokens grouped by scale, coarsest first, in
    raster order (the `PatchLayout` order). ``num_padding`` trailing padding tokens are appended.
    Anything else (other dtypes or channel counts, sides that are not multiples of the patch size,
    layouts that do not fit their image) raises ``ValueError`` naming the image index.
    """
    import torch

    cfg = cfg or APTConfig()
    images = [_as_rgb(im, i) for i, im in enumerate(images)]
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"got {len(labels)} labels for {len(images)} images")
    if int(num_prefix_tokens) != num_prefix_tokens or num_prefix_tokens < 0 or int(num_padding) != num_padding or num_padding < 0:
        raise ValueError(f"num_prefix_tokens and num_padding must be ints >= 0, got {num_prefix_tokens!r}, {num_padding!r}")
    if layouts is None:
        layouts = []
        for i, im in enumerate(images):
            try:
                layouts.append(patchify(im, cfg))
            except ValueError as e:
                raise ValueError(f"image {i}: {e}") from None
    if len(layouts) != len(images):
        raise ValueError(f"got {len(layouts)} layouts for {len(images)} images")
    for i, (im, lay) in enumerate(zip(images, layouts)):
        _check_layout(lay, im, cfg, i)
    S, p = cfg.num_scales, cfg.patch_size
    B = len(images)
    n_tok = np.array([len(lay) for lay in layouts], np.int64)
    seqlens = n_tok + num_prefix_tokens
    cu = np.zeros(B + 1, np.int64)
    np.cumsum(seqlens, out=cu[1:])
    # all tokens of the batch, image after image, each image in its layout order (coarsest first)
    ys = np.concatenate([lay.y for lay in layouts]) if B else np.zeros(0, np.int32)
    xs = np.concatenate([lay.x for lay in layouts]) if B else np.zeros(0, np.int32)
    sc = np.concatenate([lay.scale for lay in layouts]) if B else np.zeros(0, np.int8)
    img_of = np.repeat(np.arange(B, dtype=np.int32), n_tok)
    tok_start = np.repeat(cu[:-1] + num_prefix_tokens - np.concatenate([[0], np.cumsum(n_tok)[:-1]]), n_tok)
    position = tok_start + np.arange(len(sc), dtype=np.int64)  # the layout order is the sequence order
    per_scale = np.bincount(sc.astype(np.int64), minlength=S)[:S] if len(sc) else np.zeros(S, np.int64)
    shared = get_worker_info() is not None  # in a DataLoader worker: write straight into shared memory
    pix_shapes = [(int(per_scale[s]), 3, p << s, p << s) for s in range(S)]
    u8 = _Arena(torch.uint8, [int(np.prod(sh)) for sh in pix_shapes], shared)
    i32 = _Arena(torch.int32, [3 * int(per_scale.sum()), B + 1], shared)
    i64 = _Arena(torch.int64, [int(per_scale.sum()), B], shared)
    pix = [u8.take(sh) for sh in pix_shapes]
    outs = tuple(t.numpy() for t in pix)
    next_row = np.zeros(S, np.int64)
    for i, (im, lay) in enumerate(zip(images, layouts)):
        bad = extract_tokens(im, lay.y, lay.x, lay.scale, p, outs, next_row)
        if bad >= 0:
            raise ValueError(f"image {i}: layout token {bad} (y={lay.y[bad]}, x={lay.x[bad]}, scale={lay.scale[bad]}) "
                             f"does not fit the {im.shape[0]}x{im.shape[1]} image on the {p}-px grid with "
                             f"{S} scales")
    coords, seq_index = [], []
    for s in range(S):
        sel = sc == s
        co = i32.take((int(per_scale[s]), 3))
        co_np = co.numpy()
        co_np[:, 0] = img_of[sel]
        co_np[:, 1] = ys[sel] // p
        co_np[:, 2] = xs[sel] // p
        coords.append(co)
        si = i64.take((int(per_scale[s]),))
        si.numpy()[:] = position[sel]
        seq_index.append(si)
    cu_t = i32.take((B + 1,))
    cu_t.numpy()[:] = cu
    labels_t = None
    if labels is not None:
        labels_t = i64.take((B,))
        labels_t.numpy()[:] = np.asarray(labels, np.int64)
    return PackedBatch(
        pixels=tuple(pix), coords=tuple(coords), seq_index=tuple(seq_index),
        cu_seqlens=cu_t, seqlens=tuple(int(v) for v in seqlens),
        max_seqlen=int(seqlens.max()) if len(seqlens) else 0,
        image_sizes=tuple((int(im.shape[0]), int(im.shape[1])) for im in images),
        num_prefix_tokens=int(num_prefix_tokens), patch_size=p, num_scales=S, num_padding=int(num_padding),
        labels=labels_t,
    )
