"""Host-side planning of the windowed models' attention segments (`APTWindowedViT`).

From the batch's CPU coordinates, with NumPy and no Python loop over tokens, every segmentation a
block attends within is planned once per batch:

- **global blocks**: one segment per image (+ the batch's padding segment), in packed order;
- **windowed blocks**: one segment per (image, window). Windows are ``ws x ws`` base cells laid from
  the image's top-left corner; each holds a variable number of tokens (a token crossing a window
  border is a ``ValueError``: pack with ``apt_data.windows.pack_windowed``). As in timm, the image
  grid is padded to a window multiple with zero tokens (after ``norm1``); those pad cells are keys
  of their window at base scale. A window segment is its tokens, then its pad cells, in raster order
  of their top-left cells; one gather (``[x; 0]`` rows) builds the window-ordered sequence.

A plan also carries every token's centre (for relative positions), the segment of every packed row
(drop path) and the length buckets of the ``padded`` path; its arrays go to a device once, without a
blocking transfer, so a forward given a plan never waits on the device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Iterable, NamedTuple, Optional

import numpy as np
import torch

from .attention import PackedContext
from .packed import PackedBatchLike, host_to_device


class Bucket(NamedTuple):
    """Segments the ``padded`` path attends in one call: one relative-position grid, padded to ``length``."""

    segments: np.ndarray              # int64 segment ids
    length: int                       # padded length Lm
    grid: Optional[tuple[int, int]]   # relative-position grid (None: the padding segment)
    full: bool                        # whole-grid segments at base scale (timm's computation)
    gather: np.ndarray                # int64 [S*Lm]: row of the segment sequence feeding every slot
    mask: np.ndarray                  # bool [S, Lm]: real (True) and padded (False) slots


@dataclass
class SegmentPlan:
    """One segmentation of the packed sequence for attention, as host-side arrays.

    ``seqlens``: segment lengths of the (gathered) attention sequence, images or windows first,
    then the batch's padding tokens as their own segment if any. ``gather``: int64 ``[Lw]`` row of
    ``[x; 0]`` feeding every slot (row ``L`` is the zero row of pad cells); None = the packed order.
    ``slots``: int64 ``[L]`` slot of every packed row. ``pos``: int64 ``[Lw, 2]`` twice the
    token centre (y, x) in base cells, segment-local. ``grids``: the relative-position grid (h, w) of
    every segment (None for the padding segment). ``full``: the segment is its whole grid at base
    scale in raster order (timm's computation applies as is). ``row_segment``: int64 ``[L]`` segment
    of every packed row (drop path draws).
    """

    seqlens: tuple[int, ...]
    num_real: int                     # image or window segments (the padding segment excluded)
    grids: tuple[Optional[tuple[int, int]], ...]
    full: tuple[bool, ...]
    pos: np.ndarray
    row_segment: np.ndarray
    gather: Optional[np.ndarray] = None
    slots: Optional[np.ndarray] = None
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def total(self) -> int:
        """Length of the segment sequence (pad cells and batch padding included)."""
        return int(sum(self.seqlens))

    @property
    def equal(self) -> bool:
        """All segments of one length and one relative-position grid: one batched attention call."""
        return len(set(self.seqlens)) == 1 and len(set(self.grids)) == 1 and self.grids[0] is not None

    def on_device(self, key: Hashable, array: np.ndarray, device: torch.device) -> torch.Tensor:
        """``array`` (one of this plan's) on ``device``, copied once per ``(key, device)`` without a
        blocking transfer (from pinned memory on CUDA)."""
        key = ("dev", key, torch.device(device))
        if key not in self._cache:
            self._cache[key] = host_to_device(torch.from_numpy(np.ascontiguousarray(array)), device)
        return self._cache[key]

    def tensors(self, device: torch.device) -> dict[str, Optional[torch.Tensor]]:
        """``pos``, ``row_segment``, ``gather``, ``slots`` on ``device`` (None where the plan has none)."""
        return {name: None if getattr(self, name) is None else self.on_device(name, getattr(self, name), device)
                for name in ("pos", "row_segment", "gather", "slots")}

    def buckets(self, H: int) -> tuple[list[Bucket], np.ndarray]:
        """Host-side plan of the ``padded`` path: segments of one rel-pos grid, sorted by length and
        grouped so a bucket's shortest segment is >= 4/5 of its longest (whole-grid segments apart:
        timm's computation), each bucket padded to its longest (a multiple of 8), in chunks whose
        ``[S, H, Lm, Lm]`` bias stays <= 2^26 elements. Returns ``(buckets, slot)``: the `Bucket` s,
        and ``slot`` ``[Lw]``, the row of every segment-sequence row in the concatenated bucket outputs."""
        key = ("buckets", H)
        if key in self._cache:
            return self._cache[key]
        lens = np.asarray(self.seqlens, np.int64)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        order = sorted(range(len(lens)), key=lambda i: (str(self.grids[i]), self.full[i], -lens[i]))
        groups, cur = [], []
        for i in order:
            if cur and (self.grids[i] != self.grids[cur[0]] or self.full[i] != self.full[cur[0]]
                        or 5 * lens[i] < 4 * lens[cur[0]]):
                groups.append(cur)
                cur = []
            cur.append(i)
        groups.append(cur)
        out, slot, done = [], np.empty(self.total, np.int64), 0
        for g in groups:
            Lm = int(lens[g[0]]) if self.full[g[0]] else -(-int(lens[g[0]]) // 8) * 8
            step = max(1, (1 << 26) // (H * Lm * Lm))
            for a in range(0, len(g), step):
                ids = np.asarray(g[a:a + step], np.int64)
                j = np.arange(Lm)
                n = lens[ids]
                gather = starts[ids, None] + np.minimum(j[None], n[:, None] - 1)
                mask = j[None] < n[:, None]
                for r, i in enumerate(ids):  # where each segment's rows land in the outputs
                    slot[starts[i]:starts[i] + lens[i]] = done + r * Lm + np.arange(lens[i])
                out.append(Bucket(ids, Lm, self.grids[ids[0]], bool(self.full[ids[0]]), gather.reshape(-1), mask))
                done += len(ids) * Lm
        self._cache[key] = (out, slot)
        return out, slot

    def context(self, device: torch.device, backend: str) -> PackedContext:
        """The `PackedContext` of these segments (over the segment sequence, pad cells included)."""
        # padded segments: a multiple of 8 slots, so the padded bias rows stay aligned for the fused
        # (memory-efficient) SDPA kernels on CUDA
        m = max(self.seqlens)
        m = m if backend == "segments" else -(-m // 8) * 8
        return PackedContext(seqlens=self.seqlens, num_images=self.num_real, total=self.total, max_seqlen=m,
                             device=torch.device(device), backend=backend)


@dataclass
class WindowedViTPlan:
    """Segmentations of one packed batch: ``segments[0]`` global (per image), ``segments[ws]`` the
    ``ws``-cell windows. Built on the host by `APTWindowedViT.plan`; reusable for the batch on any device."""

    segments: dict[int, SegmentPlan]
    seq_len: int


def token_table(batch: PackedBatchLike) -> tuple[np.ndarray, ...]:
    """(image, y, x, cells, packed row) of every patch token, all scales, from the CPU coords."""
    bs, ys, xs, fs, rows = [], [], [], [], []
    for s in range(batch.num_scales):
        co = batch.coords[s]
        if co.shape[0] == 0:
            continue
        co = co.detach().cpu().numpy().astype(np.int64)  # host tensors: no copy, no sync
        bs.append(co[:, 0])
        ys.append(co[:, 1])
        xs.append(co[:, 2])
        fs.append(np.full(co.shape[0], 1 << s, np.int64))
        rows.append(batch.seq_index[s].detach().cpu().numpy().astype(np.int64))
    return tuple(np.concatenate(a) for a in (bs, ys, xs, fs, rows))


def image_grids(batch: PackedBatchLike) -> list[tuple[int, int]]:
    """(h, w) of every image in base cells."""
    p = batch.patch_size
    return [(h // p, w // p) for h, w in batch.image_sizes]


def plan_global(batch: PackedBatchLike) -> SegmentPlan:
    """Global blocks: one segment per image (+ the padding segment), packed order, image-global centres."""
    b, y, x, f, rows = token_table(batch)
    L = batch.seq_len
    pos = np.zeros((L, 2), np.int64)
    pos[rows, 0] = 2 * y + f - 1
    pos[rows, 1] = 2 * x + f - 1
    seqlens = tuple(int(n) for n in batch.seqlens) + ((int(batch.num_padding),) if batch.num_padding else ())
    grids = tuple(image_grids(batch)) + ((None,) if batch.num_padding else ())
    full = tuple(g is not None and n == g[0] * g[1] for n, g in zip(seqlens, grids))  # all base scale: raster
    row_segment = np.repeat(np.arange(len(seqlens)), seqlens)
    return SegmentPlan(seqlens=seqlens, num_real=batch.num_images, grids=grids, full=full, pos=pos,
                       row_segment=row_segment)


def plan_windows(batch: PackedBatchLike, window: int) -> SegmentPlan:
    """Windowed blocks: one segment per (image, window) of ``window`` x ``window`` base cells, in
    image then window raster order; inside a window its tokens and pad cells (the grid padded to a
    window multiple, as timm) in raster order of their top-left cells. Raises ``ValueError`` for a
    token that crosses a window border."""
    ws = int(window)
    b, y, x, f, rows = token_table(batch)
    bad = ((y % ws) + f > ws) | ((x % ws) + f > ws)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{int(bad.sum())} token(s) cross a border of the {ws}x{ws}-cell attention windows (first: image "
            f"{b[i]}, a {f[i]}x{f[i]}-cell token at cell ({y[i]}, {x[i]})); pack windowed batches with "
            f"apt_data.windows.pack_windowed(images, cfg, window={ws}) (or split_for_windows on the layouts)")
    grids = image_grids(batch)
    nwh = np.array([-(-h // ws) for h, _ in grids], np.int64)
    nww = np.array([-(-w // ws) for _, w in grids], np.int64)
    woff = np.concatenate([[0], np.cumsum(nwh * nww)])
    nwin = int(woff[-1])
    L = batch.seq_len
    # real tokens
    wid = [woff[b] + (y // ws) * nww[b] + x // ws]
    py, px = [2 * (y % ws) + f - 1], [2 * (x % ws) + f - 1]
    src, key = [rows], [(y % ws) * ws + x % ws]
    # pad cells of every image: the padded grid outside the image, zero rows
    for i, (h, w) in enumerate(grids):
        H, W = int(nwh[i]) * ws, int(nww[i]) * ws
        if H * W == h * w:
            continue
        cy, cx = np.nonzero(np.pad(np.zeros((h, w), bool), ((0, H - h), (0, W - w)), constant_values=True))
        wid.append(woff[i] + (cy // ws) * nww[i] + cx // ws)
        py.append(2 * (cy % ws))
        px.append(2 * (cx % ws))
        src.append(np.full(len(cy), L, np.int64))
        key.append((cy % ws) * ws + cx % ws)
    if batch.num_padding:  # the batch's padding tokens: their own trailing segment
        r = np.arange(L - batch.num_padding, L, dtype=np.int64)
        wid.append(np.full(len(r), nwin, np.int64))
        py.append(np.zeros(len(r), np.int64))
        px.append(np.zeros(len(r), np.int64))
        src.append(r)
        key.append(r)
    wid, py, px, src, key = (np.concatenate(a).astype(np.int64) for a in (wid, py, px, src, key))
    order = np.lexsort((key, wid))
    gather = src[order]
    nseg = nwin + (1 if batch.num_padding else 0)
    seqlens = tuple(int(n) for n in np.bincount(wid, minlength=nseg))
    real = gather < L
    slots = np.empty(L, np.int64)
    slots[gather[real]] = np.nonzero(real)[0]
    row_segment = np.empty(L, np.int64)
    row_segment[gather[real]] = wid[order][real]
    pos = np.stack([py[order], px[order]], 1)
    grids_seg = ((ws, ws),) * nwin + ((None,) if batch.num_padding else ())
    full = tuple(n == ws * ws for n in seqlens[:nwin]) + ((False,) if batch.num_padding else ())
    return SegmentPlan(seqlens=seqlens, num_real=nwin, grids=grids_seg, full=full, pos=pos,
                       row_segment=row_segment, gather=gather, slots=slots)


def plan_segments(batch: PackedBatchLike, window_sizes: Iterable[int]) -> WindowedViTPlan:
    """The segmentations of ``batch`` for blocks with these window sizes (0: global attention)."""
    segs = {0: plan_global(batch)}
    for w in sorted({int(w) for w in window_sizes} - {0}):
        segs[w] = plan_windows(batch, w)
    return WindowedViTPlan(segments=segs, seq_len=batch.seq_len)
