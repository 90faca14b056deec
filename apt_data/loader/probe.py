"""The epoch-length probe of streamed training: the mean tokens per sample of the pipeline.

The probed samples are the first each worker role draws in pass 0 (`probe_ids`). With one rank,
forked workers probe them as they start (`ProbeBoard`) and keep them for their first batches;
otherwise the main process probes the same samples itself: the same numbers either way.
"""
from __future__ import annotations

import mmap
import time
from typing import Optional

import numpy as np

from ..config import OverBudget, SettingError
from ..pipeline import TooManySkipped, probe_mean
from .stream import SampleStream, partition

__all__ = ["ProbeBoard", "probe_ids"]

_PENDING, _NONE, _FAILED = -1, 0, -2
_ERRORS = {cls.__name__: cls for cls in (TooManySkipped, OverBudget, SettingError, ValueError, OSError)}


def probe_ids(num_samples: int, seed: int, world_size: int, roles: int, shuffle: bool,
              probe_samples: int) -> list[np.ndarray]:
    """Per (rank, role), rank-major: the samples it draws first in pass 0, ``probe_samples`` in all."""
    k = -(-probe_samples // (world_size * roles))
    out = []
    for r in range(world_size):
        for w in range(roles):
            stream = SampleStream(partition(num_samples, seed, r, world_size, w, roles, shuffle), seed, r * roles + w,
                                  shuffle)
            out.append(stream.order(0)[:k].copy() if len(stream) else np.zeros(0, np.int64))
    return out


class ProbeBoard:
    """Shared memory where forked workers post their probed token counts (one row per role) and wait for
    each other; a failed probe posts its error, which every waiting worker raises."""

    def __init__(self, ids: list[np.ndarray]):
        self.ids = ids
        self.k = max((len(i) for i in ids), default=0)
        self._mm = mmap.mmap(-1, len(ids) * self.k * 8 + 4096)  # anonymous, shared with forked workers
        self.counts = np.frombuffer(self._mm, np.int64, len(ids) * self.k).reshape(len(ids), self.k)
        self.counts[:] = _NONE
        for role, i in enumerate(ids):
            self.counts[role, :len(i)] = _PENDING

    def post(self, role: int, j: int, tokens: Optional[int]) -> None:
        self.counts[role, j] = tokens or _NONE

    def fail(self, error: BaseException) -> None:
        text = f"{type(error).__name__}\n{error}".encode()[:4000]
        self._mm[-4096:-4096 + len(text) + 1] = text + b"\0"
        self.counts.flat[0] = _FAILED

    def complete(self) -> bool:
        return bool((self.counts != _PENDING).all())

    def wait(self, poll: float = 0.002) -> None:
        """Until every role has posted (or one failed: its error is raised here too)."""
        while True:
            if self.counts.flat[0] == _FAILED:
                name, _, msg = bytes(self._mm[-4096:]).split(b"\0", 1)[0].decode().partition("\n")
                raise _ERRORS.get(name, RuntimeError)(msg)
            if self.complete():
                return
            time.sleep(poll)

    def mean(self, first_key: str) -> float:
        """The probe's mean tokens per sample: the same number `probe_mean` gives for the same samples."""
        counts = [int(c) if c > 0 else None for row, i in zip(self.counts, self.ids) for c in row[:len(i)]]
        return probe_mean(counts, [first_key])

    def __reduce__(self):  # a spawned (not forked) worker cannot share the mapping
        raise TypeError("a ProbeBoard is shared with forked workers only")
