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
    """
    for t in range(scales.shape[0]):
        s = scales[t]
        size = patch_size << s
        out = outs[s]
        k = next_row[s]
        y0 = ys[t]
        x0 = xs[t]
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


def extract_tokens_reference(image: np.ndarray, layout: PatchLayout, scale: int) -> np.ndarray:
    """Plain NumPy twin of `extract_tokens` (tests only): ``[T_s, 3, P, P]`` uint8 of one scale."""
    size = layout.patch_size << scale
    sel = np.nonzero(layout.scale == scale)[0]
    out = np.zeros((len(sel), 3, size, size), np.uint8)
    for k, t in enumerate(sel):
        y, x = int(layout.y[t]), int(layout.x[t])
        out[k] = image[y:y + size, x:x + size].transpose(2, 0, 1)
    return out


def _empty_uint8(shape: tuple, shared: bool):
    """An uninitialised uint8 tensor, in shared memory when ``shared`` (what default_collate does
    in workers, so sending the batch to the main process copies nothing)."""
    import torch

    if not shared:
        return torch.empty(shape, dtype=torch.uint8)
    n = int(np.prod(shape))
    storage = torch.UntypedStorage._new_shared(n)
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape)


def _as_rgb(image: np.ndarray, i: int) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image {i}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image {i}: expected dtype uint8, got {image.dtype} (convert with apt_data.to_rgb_uint8)")
    if image.ndim == 2:  # gray: documented conversion, the channel repeated 3 times
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image {i}: expected shape HxWx3 or HxW, got {image.shape}")
    return np.ascontiguousarray(image)


def pack_images(images: Sequence[np.ndarray], cfg: Optional[APTConfig] = None, labels: Optional[Sequence[int]] = None,
                num_prefix_tokens: int = 1, layouts: Optional[Sequence[PatchLayout]] = None,
                num_padding: int = 0) -> PackedBatch:
    """Pack uint8 HxWx3 images (HxW gray: repeated to 3 channels) into one `PackedBatch`.

    ``layouts`` (one per image) skips `patchify` when they are already known. Each image's segment
    is ``num_prefix_tokens`` prefix slots, then its tokens grouped by scale, coarsest first, in
    raster order (the `PatchLayout` order). ``num_padding`` trailing padding tokens are appended.
    """
    import torch

    cfg = cfg or APTConfig()
    images = [_as_rgb(im, i) for i, im in enumerate(images)]
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
        if tuple(lay.image_size) != im.shape[:2] or lay.patch_size != cfg.patch_size or lay.num_scales != cfg.num_scales:
            raise ValueError(f"image {i}: layout is for a {lay.image_size} image with patch {lay.patch_size} and "
                             f"{lay.num_scales} scales, not {im.shape[:2]} with {cfg.patch_size} and {cfg.num_scales}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"got {len(labels)} labels for {len(images)} images")
    if num_prefix_tokens < 0 or num_padding < 0:
        raise ValueError("num_prefix_tokens and num_padding must be >= 0")
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
    pix = [_empty_uint8((int(per_scale[s]), 3, p << s, p << s), shared) for s in range(S)]
    outs = tuple(t.numpy() for t in pix)
    next_row = np.zeros(S, np.int64)
    for im, lay in zip(images, layouts):
        extract_tokens(im, lay.y, lay.x, lay.scale, p, outs, next_row)
    pixels, coords, seq_index = [], [], []
    for s in range(S):
        sel = sc == s
        co = np.empty((int(per_scale[s]), 3), np.int32)
        co[:, 0] = img_of[sel]
        co[:, 1] = ys[sel] // p
        co[:, 2] = xs[sel] // p
        pixels.append(pix[s])
        coords.append(torch.from_numpy(co))
        seq_index.append(torch.from_numpy(position[sel]))
    return PackedBatch(
        pixels=tuple(pixels), coords=tuple(coords), seq_index=tuple(seq_index),
        cu_seqlens=torch.from_numpy(cu.astype(np.int32)), seqlens=tuple(int(v) for v in seqlens),
        max_seqlen=int(seqlens.max()) if len(seqlens) else 0,
        image_sizes=tuple((int(im.shape[0]), int(im.shape[1])) for im in images),
        num_prefix_tokens=int(num_prefix_tokens), patch_size=p, num_scales=S, num_padding=int(num_padding),
        labels=None if labels is None else torch.as_tensor(np.asarray(labels, np.int64)),
    )
