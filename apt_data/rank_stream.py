"""Where one rank's streamed packing stands between batches: what `APTLoader` saves and resumes from.

For every worker role it keeps the `WorkerState` at the start of the current epoch and the one
after the role's last batch that the main process consumed, plus the number of batches consumed
in the epoch. From these a fresh set of worker processes continues the stream exactly (after a
resume, or when workers were not kept), and the next epoch starts where this one ended.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .stream import WorkerState

__all__ = ["RankStream"]


@dataclass
class RankStream:
    """Per-role stream states of one rank for ``epoch``; ``consumed`` batches of it taken so far."""

    roles: int
    epoch: int = 0
    starts: list = field(default_factory=list)
    progress: list = field(default_factory=list)
    consumed: int = 0

    def __post_init__(self) -> None:
        if not self.starts:
            self.restart(self.epoch)

    def restart(self, epoch: int) -> None:
        """Begin ``epoch`` with nothing carried over: every role at the start of pass ``epoch``."""
        self.epoch, self.consumed = int(epoch), 0
        self.starts = [WorkerState(pass_=int(epoch)) for _ in range(self.roles)]
        self.progress = [None] * self.roles

    def follow(self) -> None:
        """Begin the next epoch where this one stands (its carried-over samples first)."""
        self.starts = [(p or s).next_epoch() for p, s in zip(self.progress, self.starts)]
        self.epoch, self.consumed, self.progress = self.epoch + 1, 0, [None] * self.roles

    def record(self, role: int, state: WorkerState) -> None:
        """A batch of ``role`` was consumed; ``state`` is its stream after that batch."""
        self.progress[role] = state
        self.consumed += 1

    def current(self, role: int) -> WorkerState:
        return self.progress[role] or self.starts[role]

    def as_dict(self) -> dict:
        return {"state_epoch": self.epoch, "step": self.consumed, "starts": [s.as_dict() for s in self.starts],
                "progress": [None if p is None else p.as_dict() for p in self.progress]}

    @classmethod
    def from_dict(cls, d: dict) -> "RankStream":
        starts = [WorkerState.from_dict(s) for s in d["starts"]]
        progress: list[Optional[WorkerState]] = [None if p is None else WorkerState.from_dict(p) for p in d["progress"]]
        return cls(len(starts), int(d["state_epoch"]), starts, progress, int(d["step"]))

    def carried_over(self, partition_sizes: list[int]) -> int:
        """Sample visits of the passes under way not yet emitted: pending in open batches, deferred, or not
        yet read in the current pass (a sample still pending from one pass may also wait unread in the
        next, and then counts twice). ``partition_sizes``: each role's number of samples."""
        total = 0
        for role in range(self.roles):
            st = self.current(role)
            total += len(st.pending()) + len(st.deferred) + ((partition_sizes[role] - st.index) if st.index else 0)
        return total
