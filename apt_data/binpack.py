"""Greedy bin-packing of variable-length images into token-budget batches: online first fit over a
few open bins (the fullest leaves when nothing fits), which keeps the shuffled order's randomness
while filling batches almost completely."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from numba import njit

from .config import SettingError, TokenBudget


@njit(cache=True, nogil=True, inline="always")
def _close(k, n_open, open_id, open_used, open_cnt, emit_order, emitted):
    """Emit open bin ``k`` as the next batch and shift the later open bins down; new ``n_open``."""
    emit_order[open_id[k]] = emitted
    for j in range(k, n_open - 1):
        open_id[j] = open_id[j + 1]
        open_used[j] = open_used[j + 1]
        open_cnt[j] = open_cnt[j + 1]
    return n_open - 1


@njit(cache=True, nogil=True)
def _first_fit(counts, max_tokens, max_images, open_bins):
    n = counts.shape[0]
    item_bin = np.empty(n, np.int64)          # provisional bin id of each item
    emit_order = np.full(n + 1, -1, np.int64)  # provisional id -> emission rank
    open_id = np.empty(open_bins, np.int64)
    open_used = np.empty(open_bins, np.int64)
    open_cnt = np.empty(open_bins, np.int64)
    n_open = 0
    next_id = 0
    emitted = 0
    for i in range(n):
        c = counts[i]
        slot = -1
        for k in range(n_open):
            if open_used[k] + c <= max_tokens and open_cnt[k] < max_images:
                slot = k
                break
        if slot < 0:
            if n_open == open_bins:
                best = 0
                for k in range(1, n_open):
                    if open_used[k] > open_used[best]:
                        best = k
                n_open = _close(best, n_open, open_id, open_used, open_cnt, emit_order, emitted)
                emitted += 1
            slot = n_open
            open_id[slot] = next_id
            open_used[slot] = 0
            open_cnt[slot] = 0
            next_id += 1
            n_open += 1
        item_bin[i] = open_id[slot]
        open_used[slot] += c
        open_cnt[slot] += 1
        if open_used[slot] == max_tokens or open_cnt[slot] == max_images:
            n_open = _close(slot, n_open, open_id, open_used, open_cnt, emit_order, emitted)
            emitted += 1
    for k in range(n_open):
        emit_order[open_id[k]] = emitted
        emitted += 1
    out = np.empty(n, np.int64)
    for i in range(n):
        out[i] = emit_order[item_bin[i]]
    return out, emitted


def pack_greedy(token_counts: Sequence[int], max_tokens: int, max_images: Optional[int] = None,
                open_bins: int = 8, names: Optional[Sequence[str]] = None) -> list[np.ndarray]:
    """Pack item token counts (prefix included) into bins of at most ``max_tokens``: int64 index arrays in
    emission order; an item over the budget raises `OverBudget` naming it."""
    counts = np.ascontiguousarray(token_counts, dtype=np.int64).reshape(-1)
    budget = TokenBudget(max_tokens, max_images)
    if open_bins < 1:
        raise SettingError(f"open_bins must be >= 1, got {open_bins}", "open_bins")
    if counts.size == 0:
        return []
    if counts.min() <= 0:
        i = int(np.argmin(counts))
        raise ValueError(f"sample {names[i] if names is not None else i} has {counts[i]} tokens")
    i = int(np.argmax(counts))
    budget.check(int(counts[i]), names[i] if names is not None else i)
    bin_of, n_bins = _first_fit(counts, budget.max_tokens, int(max_images or np.iinfo(np.int64).max), int(open_bins))
    order = np.argsort(bin_of, kind="stable")
    bounds = np.searchsorted(bin_of[order], np.arange(n_bins + 1))
    return [order[bounds[b]:bounds[b + 1]] for b in range(n_bins)]


_NO_CAP = np.iinfo(np.int64).max


class FirstFit:
    """Online first fit over ``open_bins`` open bins, step by step: the one packing rule.

    An item goes into the first open bin with room; when none has room and all are open, the fullest
    leaves (exactly full bins leave at once) into ``ready``. `_first_fit` is the compiled twin.
    """

    def __init__(self, max_tokens: int, max_images: Optional[int] = None, open_bins: int = 8):
        if open_bins < 1:
            raise SettingError(f"open_bins must be >= 1, got {open_bins}", "open_bins")
        self.budget = TokenBudget(max_tokens, max_images)
        self.max_tokens, self.max_images, self.open_bins = self.budget.max_tokens, self.budget.max_images, int(open_bins)
        self.bins: list[list] = []
        self.used: list[int] = []
        self.ready: list[list] = []

    def _close(self, k: int) -> None:
        self.ready.append(self.bins.pop(k))
        self.used.pop(k)

    def add(self, item, tokens: int, leave: bool = True, cap: Optional[int] = None) -> None:
        """Place ``item`` of ``tokens`` tokens; ``leave=False``: no bin leaves (any number stay open);
        ``cap``: at most this many items in a bin for this placement, below ``max_images``."""
        self.budget.check(tokens, item)
        cap = min(cap or _NO_CAP, self.max_images or _NO_CAP)
        fits = (k for k, b in enumerate(self.bins) if self.used[k] + tokens <= self.max_tokens and len(b) < cap)
        slot = next(fits, -1)
        if slot < 0:
            if leave and len(self.bins) >= self.open_bins:
                self._close(self.used.index(max(self.used)))  # the first of the fullest
            self.bins.append([])
            self.used.append(0)
            slot = len(self.bins) - 1
        self.bins[slot].append(item)
        self.used[slot] += int(tokens)
        if leave and (self.used[slot] == self.max_tokens or len(self.bins[slot]) >= cap):
            self._close(slot)


def pack_greedy_reference(token_counts, max_tokens, max_images=None, open_bins=8) -> list[list[int]]:
    """`pack_greedy` by `FirstFit` (tests compare the two)."""
    ff = FirstFit(max_tokens, max_images, open_bins)
    for i, c in enumerate(token_counts):
        ff.add(i, c)
    return ff.ready + ff.bins


def split_for_ranks(bins: list[np.ndarray], world_size: int) -> list[np.ndarray]:
    """Halve the bins with most images until their number is a multiple of ``world_size`` (every rank
    gets as many batches; no sample dropped or repeated)."""
    bins = list(bins)
    if world_size <= 1 or not bins:
        return bins
    need = (-len(bins)) % world_size
    total_items = sum(len(b) for b in bins)
    if total_items < world_size:
        raise ValueError(f"{total_items} samples cannot be spread over {world_size} ranks")
    for _ in range(need):
        k = max(range(len(bins)), key=lambda j: (len(bins[j]), -j))
        b = bins[k]
        if len(b) < 2:
            raise ValueError(f"cannot give {world_size} ranks the same number of batches: "
                             f"{len(bins)} single-image batches")
        half = len(b) // 2
        bins[k:k + 1] = [b[:half], b[half:]]
    return bins
