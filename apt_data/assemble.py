"""`pack_images`: many images of any sizes -> one `PackedBatch` (token pixels per scale + metadata).

A Numba kernel copies token pixels straight into per-scale CHW arrays of one buffer
(`buffer_layout`); `prepare_batch` sizes a batch (`BatchSpec`), `fill_batch` writes it into any
buffer, `BatchSpec.to_batch` wraps one.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from numba import njit
from torch.utils.data import get_worker_info

from .batch import PackedBatch
from .config import APTConfig
from .image import check_image
from .layout import PatchLayout, patchify


@njit(cache=True, nogil=True)
def extract_tokens(image, ys, xs, scales, patch_size, outs, next_row):
    """Copy every token of one HxWx3 image into ``outs[scale][next_row[scale]]`` as CHW, advancing
    ``next_row`` in place. Returns -1, or the first token that does not fit (Numba does not
    bounds-check, so the kernel does)."""
    H = image.shape[0]
    W = image.shape[1]
    rows = image.reshape((H, W * 3))  # contiguous RGB rows: each token row is one stride-3 split
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
        for r in range(size):  # read each pixel row once, write the three channel rows (SIMD)
            src = rows[y0 + r, 3 * x0:3 * (x0 + size)]
            d0 = out[k, 0, r]
            d1 = out[k, 1, r]
            d2 = out[k, 2, r]
            for q in range(size):
                d0[q] = src[3 * q]
                d1[q] = src[3 * q + 1]
                d2[q] = src[3 * q + 2]
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


_ALIGN = 64  # byte alignment of every array in a batch buffer


def buffer_layout(per_scale: Sequence[int], num_images: int, patch_size: int, with_labels: bool):
    """Where every array of a packed batch lies in ONE byte buffer (one shared-memory segment, one copy
    to pin): ``([(dtype, shape, byte offset)], total bytes)``; pixels, coords, seq_index, labels."""
    fields, off = [], 0

    def add(dtype, shape):
        nonlocal off
        fields.append((dtype, shape, off))
        off += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // _ALIGN) * _ALIGN

    for s, n in enumerate(per_scale):
        add(np.uint8, (int(n), 3, patch_size << s, patch_size << s))
    for n in per_scale:
        add(np.int32, (int(n), 3))
    for n in per_scale:
        add(np.int64, (int(n),))
    if with_labels:
        add(np.int64, (num_images,))
    return fields, max(off, _ALIGN)


@dataclass(frozen=True)
class BatchSpec:
    """A packed batch without its bytes (buffer layout + metadata): picklable, what a worker sends beside
    the buffer it filled; `to_batch` wraps the buffer without copying. ``mix_labels`` / ``mix_lam``: the
    mixed targets, a few Python numbers per image carried beside the buffer."""

    per_scale: tuple[int, ...]
    num_images: int
    patch_size: int
    num_scales: int
    with_labels: bool
    seqlens: tuple[int, ...]
    image_sizes: tuple[tuple[int, int], ...]
    num_prefix_tokens: int
    num_padding: int
    keys: tuple = ()
    skipped: tuple = ()
    skip_reasons: tuple = ()
    mix_labels: Optional[tuple[int, ...]] = None
    mix_lam: Optional[tuple[float, ...]] = None

    @functools.cached_property
    def nbytes(self) -> int:
        return buffer_layout(self.per_scale, self.num_images, self.patch_size, self.with_labels)[1]

    def arrays(self, buf: np.ndarray) -> list[np.ndarray]:
        """NumPy views of every array in ``buf`` (uint8, at least ``nbytes``), in `buffer_layout` order."""
        fields, _ = buffer_layout(self.per_scale, self.num_images, self.patch_size, self.with_labels)
        return [np.ndarray(shape, dtype, buffer=buf, offset=off) for dtype, shape, off in fields]

    def to_batch(self, data) -> PackedBatch:
        """The `PackedBatch` whose tensors are views of ``data`` (a uint8 tensor of >= ``nbytes``)."""
        storage, base = data.untyped_storage(), data.storage_offset()
        fields, _ = buffer_layout(self.per_scale, self.num_images, self.patch_size, self.with_labels)
        ts = []
        for dtype, shape, off in fields:
            tdt = _TORCH_DTYPES[np.dtype(dtype)]
            ts.append(torch.empty(0, dtype=tdt).set_(storage, (base + off) // tdt.itemsize, shape))
        S = self.num_scales
        return PackedBatch(
            pixels=tuple(ts[:S]), coords=tuple(ts[S:2 * S]), seq_index=tuple(ts[2 * S:3 * S]),
            seqlens=self.seqlens, max_seqlen=max(self.seqlens, default=0), image_sizes=self.image_sizes,
            num_prefix_tokens=self.num_prefix_tokens, patch_size=self.patch_size, num_scales=S,
            num_padding=self.num_padding, labels=ts[3 * S] if self.with_labels else None,
            keys=self.keys, skipped=self.skipped, skip_reasons=self.skip_reasons,
            mix_labels=None if self.mix_labels is None else torch.tensor(self.mix_labels, dtype=torch.int64),
            mix_lam=None if self.mix_lam is None else torch.tensor(self.mix_lam, dtype=torch.float32))


_TORCH_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64}


def new_buffer(nbytes: int, shared: bool):
    """A uint8 tensor of ``nbytes``: in shared memory (DataLoader workers, as default_collate does)
    or private."""
    if shared:
        storage = torch.UntypedStorage._new_shared(nbytes)
        return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,))
    return torch.empty(nbytes, dtype=torch.uint8)


def _as_rgb(image: np.ndarray, i: int) -> np.ndarray:
    """Image ``i`` as a C-contiguous uint8 HxWx3 array (`check_image`); gray repeated to 3 channels."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image {i}: expected a numpy array, got {type(image).__name__} "
                         "(decode files with apt_data.load_image)")
    image = check_image(image, f"image {i}")
    return np.ascontiguousarray(np.repeat(image[:, :, None], 3, axis=2)) if image.ndim == 2 else image


def layouts_of(images: Sequence[np.ndarray], layout: Callable[[np.ndarray], PatchLayout]) -> list[PatchLayout]:
    """``layout(image)`` of every image; an error names the image's index."""
    out = []
    for i, im in enumerate(images):
        try:
            out.append(layout(im))
        except ValueError as e:
            raise ValueError(f"image {i}: {e}") from None
    return out


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
    """Pack uint8 HxWx3 (or gray) images into one `PackedBatch` of views of one buffer.

    ``layouts`` skips `patchify`; each segment is ``num_prefix_tokens`` slots, then the tokens in
    `PatchLayout` order; ``num_padding`` tokens trail. Bad input raises ``ValueError`` naming the image.
    """
    spec, images, layouts, labels = prepare_batch(images, cfg, labels, num_prefix_tokens, layouts, num_padding)
    data = new_buffer(spec.nbytes, shared=get_worker_info() is not None)
    fill_batch(spec, images, layouts, labels, data.numpy())
    return spec.to_batch(data)


def prepare_batch(images, cfg=None, labels=None, num_prefix_tokens=1, layouts=None, num_padding=0, keys=(),
                  skipped=(), skip_reasons=(), mix=None):
    """Validate the inputs of `pack_images` and size the batch: ``(spec, images, layouts, labels)``.
    ``mix``: ``(mix_labels, mix_lam)``, one of each per image (`apt_data.mixing`)."""
    cfg = cfg or APTConfig()
    images = [_as_rgb(im, i) for i, im in enumerate(images)]
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"got {len(labels)} labels for {len(images)} images")
    if mix is not None and (labels is None or not len(mix[0]) == len(mix[1]) == len(images)):
        raise ValueError(f"mixed targets need labels and one mix label and lam per image ({len(images)} images)")
    if int(num_prefix_tokens) != num_prefix_tokens or num_prefix_tokens < 0 or int(num_padding) != num_padding or num_padding < 0:
        raise ValueError(f"num_prefix_tokens and num_padding must be ints >= 0, got {num_prefix_tokens!r}, {num_padding!r}")
    if layouts is None:
        layouts = layouts_of(images, lambda im: patchify(im, cfg))
    if len(layouts) != len(images):
        raise ValueError(f"got {len(layouts)} layouts for {len(images)} images")
    for i, (im, lay) in enumerate(zip(images, layouts)):
        _check_layout(lay, im, cfg, i)
    S = cfg.num_scales
    per_scale = np.zeros(S, np.int64)
    for lay in layouts:  # tokens of an unknown scale are not counted here: extraction reports them
        per_scale += np.bincount(lay.scale.astype(np.int64), minlength=S)[:S] if lay.scale.min() >= 0 else 0
    seqlens = [len(lay) + int(num_prefix_tokens) for lay in layouts]
    spec = BatchSpec(tuple(int(n) for n in per_scale), len(images), cfg.patch_size, S, labels is not None,
                     tuple(seqlens), tuple((int(im.shape[0]), int(im.shape[1])) for im in images),
                     int(num_prefix_tokens), int(num_padding), tuple(keys), tuple(skipped), tuple(skip_reasons),
                     None if mix is None else tuple(int(v) for v in mix[0]),
                     None if mix is None else tuple(float(v) for v in mix[1]))
    return spec, images, layouts, labels


def fill_batch(spec: BatchSpec, images, layouts, labels, buf: np.ndarray) -> None:
    """Write a batch (`prepare_batch`'s outputs) into the uint8 buffer ``buf`` (>= ``spec.nbytes``)."""
    S, p, B = spec.num_scales, spec.patch_size, spec.num_images
    arrays = spec.arrays(buf)
    outs = tuple(arrays[:S])
    coords, seq_index = arrays[S:2 * S], arrays[2 * S:3 * S]
    next_row = np.zeros(S, np.int64)
    for i, (im, lay) in enumerate(zip(images, layouts)):
        bad = extract_tokens(im, lay.y, lay.x, lay.scale, p, outs, next_row)
        if bad >= 0:
            raise ValueError(f"image {i}: layout token {bad} (y={lay.y[bad]}, x={lay.x[bad]}, scale={lay.scale[bad]}) "
                             f"does not fit the {im.shape[0]}x{im.shape[1]} image on the {p}-px grid with "
                             f"{S} scales")
    n_tok = np.array([len(lay) for lay in layouts], np.int64)
    cu = np.zeros(B + 1, np.int64)  # segment starts (host-side only: the batch carries seqlens)
    np.cumsum(np.asarray(spec.seqlens, np.int64), out=cu[1:])
    if B:
        # all tokens of the batch, image after image, each image in its layout order (coarsest first)
        sc = np.concatenate([lay.scale for lay in layouts])
        ys = np.concatenate([lay.y for lay in layouts])
        xs = np.concatenate([lay.x for lay in layouts])
        img_of = np.repeat(np.arange(B, dtype=np.int32), n_tok)
        tok_start = np.repeat(cu[:-1] + spec.num_prefix_tokens - np.concatenate([[0], np.cumsum(n_tok)[:-1]]), n_tok)
        position = tok_start + np.arange(len(sc), dtype=np.int64)  # the layout order is the sequence order
        for s in range(S):
            sel = sc == s
            co = coords[s]
            co[:, 0] = img_of[sel]
            co[:, 1] = ys[sel] // p
            co[:, 2] = xs[sel] // p
            seq_index[s][:] = position[sel]
    if labels is not None:
        arrays[3 * S][:] = np.asarray(labels, np.int64)
