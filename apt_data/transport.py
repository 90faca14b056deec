"""How a loader worker hands a packed batch to the main process: a slot of a shared-memory pool.

A fresh shared-memory segment per batch (torch's default) costs more CPU than building the batch,
so the parent maps a `SlotPool` once before the workers fork; a worker packs into a free slot and
sends the `BatchSpec` and slot number (`WireBatch`); the main process copies the bytes out and
returns the slot. No free slot, or a batch too large: a fresh segment.
"""
from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import mmap
import os
import weakref
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import get_worker_info

from .batch import PackedBatch
from .layout import PatchLayout
from .assemble import BatchSpec, fill_batch, new_buffer

__all__ = ["SlotPool", "WireBatch", "forks", "host_buffer", "ship_batch", "take_pool"]

_POOLS: "weakref.WeakValueDictionary[int, SlotPool]" = weakref.WeakValueDictionary()
_POOL_IDS = itertools.count()


class SlotPool:
    """``num_workers x slots`` shared-memory slots of ``slot_bytes`` in one anonymous mapping, reused;
    each worker's free slot numbers travel through its own pipe (one byte each)."""

    def __init__(self, num_workers: int, slots: int, slot_bytes: int):
        self.num_workers, self.slots, self.slot_bytes = int(num_workers), int(slots), int(slot_bytes)
        self.busy = False
        self._mm = mmap.mmap(-1, self.num_workers * self.slots * self.slot_bytes)  # anonymous, MAP_SHARED
        self.buf = np.frombuffer(self._mm, np.uint8)
        self._pipes = [os.pipe() for _ in range(self.num_workers)]  # free slot numbers, one pipe per worker
        for r, _ in self._pipes:
            os.set_blocking(r, False)
        self.id = next(_POOL_IDS)
        _POOLS[self.id] = self
        self._owner = os.getpid()

    def reset(self) -> None:
        """Every slot free (call only while no worker of this pool runs)."""
        for r, w in self._pipes:
            with contextlib.suppress(BlockingIOError):
                while os.read(r, 4096):
                    pass
            os.write(w, bytes(range(self.slots)))

    def acquire(self, worker: int, nbytes: int) -> Optional[int]:
        """A free slot of ``worker`` for ``nbytes`` (in the worker), or None."""
        if nbytes > self.slot_bytes or not 0 <= worker < self.num_workers:
            return None
        try:
            b = os.read(self._pipes[worker][0], 1)
        except BlockingIOError:
            return None
        return b[0] if b else None

    def release(self, worker: int, slot: int) -> None:
        os.write(self._pipes[worker][1], bytes([slot]))

    def view(self, worker: int, slot: int, nbytes: int) -> np.ndarray:
        base = (worker * self.slots + slot) * self.slot_bytes
        return self.buf[base:base + nbytes]

    def __reduce__(self):  # a spawned (not forked) worker cannot share the mapping: it gets no pool
        return (_no_pool, ())

    def __del__(self):
        if getattr(self, "_owner", None) == os.getpid():
            for r, w in getattr(self, "_pipes", ()):
                for fd in (r, w):
                    with contextlib.suppress(OSError):
                        os.close(fd)


def _no_pool() -> None:
    return None


def worker_id() -> tuple[int, int]:
    """``(id, num_workers)`` of this DataLoader worker process; ``(0, 1)`` in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    """Where the main process copies a batch out of its slot (page-locked when pinning)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)


class WireBatch:
    """What a worker sends for one batch: its `BatchSpec` and bytes (pool slot or tensor), made a
    `PackedBatch` of one private (or pinned) buffer in the main process."""

    def __init__(self, spec: BatchSpec, pool_id: Optional[int] = None, worker: int = 0, slot: int = 0,
                 data: Optional[torch.Tensor] = None, masks: Optional[tuple] = None):
        self.spec, self.pool_id, self.worker, self.slot, self.data = spec, pool_id, worker, slot, data
        self.masks = masks  # segmentation masks, packed: (flat uint8 array, sizes), sent beside the slot

    def with_masks(self, masks: Sequence[np.ndarray], same_size: bool = True) -> "WireBatch":
        """This batch carrying the segmentation masks of its images (`PackedBatch.with_masks`)."""
        from .masks import batch_masks

        self.masks = batch_masks(masks, self.spec.image_sizes, self.spec.keys, same_size)
        return self

    def _bytes(self, pin: bool = False) -> torch.Tensor:
        if self.data is not None:
            return self.data.pin_memory() if pin else self.data
        pool = _POOLS[self.pool_id]
        out = host_buffer(self.spec.nbytes, pin)
        # a NumPy copy: one thread (torch would wake its intra-op pool, which then spins on the cores
        # the workers need)
        np.copyto(out.numpy(), pool.view(self.worker, self.slot, self.spec.nbytes))
        pool.release(self.worker, self.slot)
        self.pool_id, self.data = None, out
        return out

    def pin_memory(self) -> "WireBatch":
        return WireBatch(self.spec, data=self._bytes(pin=True), masks=self.masks)

    def to_batch(self) -> PackedBatch:
        batch = self.spec.to_batch(self._bytes())
        return batch if self.masks is None else batch.with_masks(self.masks)


def ship_batch(spec: BatchSpec, images: Sequence[np.ndarray], layouts: Sequence[PatchLayout],
               labels: Optional[Sequence[int]], pool: Optional[SlotPool] = None) -> Union[PackedBatch, WireBatch]:
    """Fill a prepared batch where it travels best: a `PackedBatch` in the main process; in a worker,
    a `WireBatch` in a free slot of ``pool`` (or in a fresh shared segment when there is none)."""
    info = get_worker_info()
    slot = pool.acquire(info.id, spec.nbytes) if info is not None and pool is not None else None
    if slot is None:
        data = new_buffer(spec.nbytes, shared=info is not None)
        fill_batch(spec, images, layouts, labels, data.numpy())
        return spec.to_batch(data) if info is None else WireBatch(spec, data=data)
    try:
        fill_batch(spec, images, layouts, labels, pool.view(info.id, slot, spec.nbytes))
    except BaseException:
        pool.release(info.id, slot)
        raise
    return WireBatch(spec, pool.id, info.id, slot)


def forks() -> bool:
    """True where DataLoader workers are forked (they then share mappings made before; asking this way
    does not fix the start method)."""
    method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    return method == "fork"


def take_pool(current: Optional[SlotPool], num_workers: int, prefetch_factor: Optional[int],
              slot_bytes: Optional[int]) -> Optional[SlotPool]:
    """A reset slot pool for one iteration: ``current`` when idle and large enough, else a new one; None
    when workers are not forked or the batch size is unknown."""
    if not forks() or not slot_bytes:
        return None
    slots = min(255, max(2, int(prefetch_factor or 2) + 1))  # slot numbers travel as one byte
    pool = current
    if (pool is None or pool.busy or pool.slot_bytes < slot_bytes or pool.num_workers != num_workers
            or pool.slots != slots):
        pool = SlotPool(num_workers, slots, slot_bytes)
    pool.reset()
    return pool
