"""Streaming token-budget packing: each loader worker packs its own samples by their real token counts.

Augmented token counts are known only after decoding, so each worker streams its fixed partition
(reshuffled every pass) into ``open_bins`` first-fit batches. An epoch is a fixed number of batches
per rank; what a worker drew but did not emit carries over. Plain data only: see docs/loader.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ..binpack import FirstFit

#: a worker's partition that holds fewer batches than this plays one whole pass per epoch, its samples
#: spread evenly over its batches (`epoch_length`): a streamed epoch would carry a third of it over
#: (its open batches): small sources see every sample in every epoch
PASS_BATCHES = 5

Ref = tuple[int, int]  # (pass, sample index): a sample's identity in the stream (its augmentation seed)


def partition(num_samples: int, seed: int, rank: int, world_size: int, worker: int, num_workers: int,
              shuffle: bool = True) -> np.ndarray:
    """The samples one worker of one rank owns: shuffled once with ``seed``, dealt to ranks, then to workers
    (all partitions disjoint, together every sample once)."""
    order = np.random.default_rng([seed, 0x5EED]).permutation(num_samples) if shuffle else np.arange(num_samples)
    return order[rank::world_size][worker::num_workers].astype(np.int64)


def epoch_length(partition_sizes: list[int], mean_tokens: float, max_tokens: int, max_images: Optional[int],
                 num_workers: int, open_bins: int = 2, margin: float = 0.03, fill: float = 0.99) -> tuple[int, bool]:
    """``(batches per rank and epoch, whole pass)``, the same on every rank (docs/loader.md, "Small sources").

    Streamed: each worker fills its share from under one pass of its partition, ``margin`` below it, less
    what its open batches hold at the end (carried over). A partition of fewer than `PASS_BATCHES`
    batches plays one whole pass per epoch instead: enough batches at 90% of the estimated fill.
    """
    per_batch = max_tokens * fill / max(float(mean_tokens), 1.0)
    if max_images:
        per_batch = min(per_batch, float(max_images))
    size, w = min(partition_sizes), max(1, num_workers)
    if size >= PASS_BATCHES * per_batch:
        return w * int((size * (1.0 - margin) - (open_bins - 0.5) * per_batch) / per_batch), False
    return w * max(1, min(size, int(np.ceil(size / (0.9 * per_batch))))), True


def worker_quotas(steps: int, num_workers: int) -> list[int]:
    """Batches each worker emits when the DataLoader reads batch ``k`` from worker ``k % num_workers``."""
    w = max(1, num_workers)
    return [steps // w + (i < steps % w) for i in range(w)]


@dataclass
class WorkerState:
    """Where one worker's stream stands: enough to continue it exactly in a fresh process.

    ``bins``: drawn, not yet emitted (pass, sample, tokens) per batch, ``ready`` of them complete;
    ``draws``: draws since the epoch began (replayed to rebuild the drawn set); ``resets``: the draw
    counts at which `SampleStream.reset` was called.
    """

    pass_: int = 0
    index: int = 0
    deferred: list = field(default_factory=list)
    bins: list = field(default_factory=list)
    draws: int = 0
    emitted: int = 0
    ready: int = 0
    resets: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"pass": self.pass_, "index": self.index, "deferred": [list(r) for r in self.deferred],
                "bins": [[list(t) for t in b] for b in self.bins], "draws": self.draws, "emitted": self.emitted,
                "ready": self.ready, "resets": list(self.resets)}

    @classmethod
    def from_dict(cls, d: dict) -> "WorkerState":
        return cls(int(d["pass"]), int(d["index"]), [tuple(int(v) for v in r) for r in d["deferred"]],
                   [[tuple(int(v) for v in t) for t in b] for b in d["bins"]], int(d["draws"]), int(d["emitted"]),
                   int(d.get("ready", 0)), [int(v) for v in d.get("resets", [])])

    def pending(self) -> list[Ref]:
        """Samples drawn but not emitted, in bin order."""
        return [(p, s) for b in self.bins for p, s, _ in b]

    def next_epoch(self) -> "WorkerState":
        """This state (taken at the end of an epoch) as the first state of the next epoch."""
        return WorkerState(self.pass_, self.index, list(self.deferred), [list(b) for b in self.bins], 0, 0,
                           self.ready, [])


class SampleStream:
    """One worker's endless order of samples: its partition reshuffled every pass, no repeat in an epoch.

    `draw` gives the next ``(pass, sample)`` (deferred ones first), or None once the whole partition
    was drawn this epoch. Draws never depend on contents, so replaying them rebuilds the stream.
    """

    def __init__(self, samples: np.ndarray, seed: int, key: int, shuffle: bool = True,
                 state: Optional[WorkerState] = None):
        self.samples = np.asarray(samples, np.int64)
        self.seed, self.key, self.shuffle = int(seed), int(key), bool(shuffle)
        self._orders: dict[int, np.ndarray] = {}
        self.start(state or WorkerState())

    def __len__(self) -> int:
        return len(self.samples)

    def start(self, state: WorkerState) -> None:
        """Begin an epoch at ``state`` (its pending samples count as drawn in this epoch)."""
        self.pass_, self.index = state.pass_, state.index
        self.deferred = list(state.deferred)
        self.seen = {s for _, s in state.pending()}
        self.draws = 0
        self.resets: list[int] = []

    def order(self, pass_: int) -> np.ndarray:
        if pass_ not in self._orders:
            if len(self._orders) > 2:
                self._orders.pop(min(self._orders))
            perm = (np.random.default_rng([self.seed, 0x9A55, pass_, self.key]).permutation(len(self.samples))
                    if self.shuffle else np.arange(len(self.samples)))
            self._orders[pass_] = self.samples[perm]
        return self._orders[pass_]

    def exhausted(self) -> bool:
        """True when every sample of the partition has been drawn in this epoch."""
        return len(self.seen) >= len(self.samples)

    def draw(self) -> Optional[Ref]:
        if len(self.samples) == 0 or self.exhausted():
            return None
        for k, (p, s) in enumerate(self.deferred):
            if s not in self.seen:
                del self.deferred[k]
                return self._take(p, s)
        while True:
            p, s = self.pass_, int(self.order(self.pass_)[self.index])
            self.index += 1
            if self.index == len(self.samples):
                self.pass_, self.index = self.pass_ + 1, 0
            if s in self.seen:
                self.deferred.append((p, s))
                continue
            return self._take(p, s)

    def _take(self, p: int, s: int) -> Ref:
        self.seen.add(s)
        self.draws += 1
        return p, s

    def reset(self) -> None:
        """Allow this epoch to draw its samples again: only when an epoch asks for more batches than
        one pass over the partition can fill (e.g. most samples were skipped as bad)."""
        self.resets.append(self.draws)
        self.seen = set()

    def replay(self, draws: int, resets: Optional[list] = None) -> None:
        """Redo ``draws`` draws (after `start`), with the `reset` calls made at draw counts
        ``resets``: the stream then stands where the original did."""
        resets = list(resets or [])
        for k in range(draws + 1):
            while resets and resets[0] == k:
                self.reset()
                resets.pop(0)
            if k < draws and self.draw() is None:
                raise ValueError(f"cannot replay {draws} draws: the partition has {len(self.samples)} samples")

    def state(self, packer: "StreamPacker", emitted: int) -> WorkerState:
        """The worker's state now, with ``packer``'s content as the pending samples."""
        return WorkerState(self.pass_, self.index, list(self.deferred), packer.snapshot(), self.draws, emitted,
                           len(packer.ready), list(self.resets))


@dataclass
class Item:
    """One processed sample in a bin: its stream identity, token count (prefix included) and payload."""

    ref: Ref
    tokens: int
    payload: Any = None

    def __str__(self) -> str:
        return f"{self.ref[1]} (pass {self.ref[0]})"


class StreamPacker(FirstFit):
    """`FirstFit` over ``open_bins`` open batches of processed samples (`Item`); left batches wait in
    ``ready`` until taken with `pop`."""

    def add(self, item: Item, tokens: Optional[int] = None, leave: bool = True, cap: Optional[int] = None) -> None:
        """``cap``: at most this many images in a batch (a whole-pass epoch spreading its samples evenly)."""
        super().add(item, item.tokens if tokens is None else tokens, leave, cap)

    def pop(self) -> Optional[list[Item]]:
        """The oldest batch that left, or None."""
        return self.ready.pop(0) if self.ready else None

    def flush(self, count: Optional[int] = None) -> None:
        """Let ``count`` open batches leave now (all when None), repacked first-fit decreasing; for more
        batches than that, the fullest-in-images are halved (fewer when items run out)."""
        items = sorted((it for b in self.bins for it in b), key=lambda it: -it.tokens)
        self.bins, self.used = [], []
        for it in items:
            self.add(it, leave=False)
        while count is not None and len(self.bins) < count:
            k = max(range(len(self.bins)), key=lambda j: (len(self.bins[j]), -j), default=-1)
            if k < 0 or len(self.bins[k]) < 2:
                break
            b, half = self.bins[k], len(self.bins[k]) // 2
            self.bins[k:k + 1] = [b[:half], b[half:]]
            self.used[k:k + 1] = [sum(it.tokens for it in b[:half]), sum(it.tokens for it in b[half:])]
        order = sorted(range(len(self.bins)), key=lambda k: -self.used[k])
        leave = set(order if count is None else order[:count])
        self.ready.extend(self.bins[k] for k in order if k in leave)
        keep = [k for k in range(len(self.bins)) if k not in leave]
        self.bins, self.used = [self.bins[k] for k in keep], [self.used[k] for k in keep]

    def snapshot(self) -> list[list[tuple[int, int, int]]]:
        """Ready then open batches as (pass, sample, tokens) lists: the packer's whole content."""
        return [[(it.ref[0], it.ref[1], it.tokens) for it in b] for b in self.ready + self.bins]

    def restore(self, bins: list[list[Item]], num_ready: int) -> None:
        self.ready = [list(b) for b in bins[:num_ready]]
        self.bins = [list(b) for b in bins[num_ready:]]
        self.used = [sum(it.tokens for it in b) for b in self.bins]


class NothingReadable(Exception):
    """A worker drew its whole partition and could use none of its samples."""


def epoch_batches(stream: SampleStream, packer: StreamPacker, quota: Optional[int], process,
                  emitted: int = 0, on_reset=None, spread: bool = False):
    """Yield ``(batch items, state after it)`` for one worker's share of an epoch.

    ``process(ref) -> Item | None`` (None: skipped as bad). ``quota``: batches this epoch; None: one
    pass, then all open batches leave (evaluation). ``spread`` (a whole-pass epoch): no batch holds
    more than its share of the samples still to come, so the last batches are as full as the first.
    A drawn-out partition flushes its open batches, then `reset`s (``on_reset`` is told); one with no
    usable sample raises `NothingReadable`.
    """
    usable = bool(packer.bins or packer.ready)
    while quota is None or emitted < quota:
        items = packer.pop()
        if items is not None:
            emitted += 1
            yield items, stream.state(packer, emitted)
            continue
        ref = stream.draw()
        if ref is None:
            if not packer.bins:
                if not usable and len(stream):
                    raise NothingReadable(f"none of the {len(stream)} samples of this partition is readable")
                if quota is None:
                    return
                usable = False
                if on_reset is not None:
                    on_reset(quota - emitted)
                stream.reset()
                continue
            packer.flush(None if quota is None else quota - emitted)
            continue
        item = process(ref)
        if item is not None:
            usable = True
            cap = None
            if spread and quota is not None:  # the samples not yet emitted over the batches still to come
                left = len(stream) - len(stream.seen) + 1 + sum(len(b) for b in packer.bins)
                cap = -(-left // max(1, quota - emitted - len(packer.ready)))
            packer.add(item, cap=cap)


@dataclass
class RankStream:
    """Per-role `WorkerState` of one rank at the epoch's start and after its last consumed batch: from
    these, fresh workers continue exactly and the next epoch starts where this one ended."""

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

    def as_dict(self) -> dict:
        return {"state_epoch": self.epoch, "step": self.consumed, "starts": [s.as_dict() for s in self.starts],
                "progress": [None if p is None else p.as_dict() for p in self.progress]}

    @classmethod
    def from_dict(cls, d: dict) -> "RankStream":
        starts = [WorkerState.from_dict(s) for s in d["starts"]]
        progress: list[Optional[WorkerState]] = [None if p is None else WorkerState.from_dict(p) for p in d["progress"]]
        return cls(len(starts), int(d["state_epoch"]), starts, progress, int(d["step"]))

    def carried_over(self, partition_sizes: list[int]) -> int:
        """Sample visits drawn or unread in the passes under way and not yet emitted (may count twice)."""
        total = 0
        for role in range(self.roles):
            st = self.progress[role] or self.starts[role]
            total += len(st.pending()) + len(st.deferred) + ((partition_sizes[role] - st.index) if st.index else 0)
        return total
